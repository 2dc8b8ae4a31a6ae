"""The ``fused`` model kind: ReContrast + patch-kNN maps, quantile-normalised and summed."""

from .scorer import FusedScorer, Resize, fit_quantiles, resize_matrix

__all__ = ["FusedScorer", "Resize", "fit_quantiles", "resize_matrix"]
