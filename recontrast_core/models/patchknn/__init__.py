"""The ``patchknn`` model kind: a training-free PatchCore-style memory bank (docs/model_kinds.md)."""

from .bank import greedy_coreset, nearest_distances, random_subsample, subsample
from .scorer import PatchKnnScorer, encoder_for, fit_patchknn

__all__ = ["PatchKnnScorer", "encoder_for", "fit_patchknn", "greedy_coreset", "nearest_distances",
           "random_subsample", "subsample"]
