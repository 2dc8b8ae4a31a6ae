"""The training-free baseline every evaluation is measured against.

Frozen backbone features + PatchCore-style patch nearest neighbours (Roth et al. 2022),
with no training at all:

1. Features of the encoder's stride-8 and stride-16 levels (its 2nd and 3rd taps), each
   averaged over its 3x3 neighbourhood; the stride-16 map is upsampled (bilinear) to the
   stride-8 grid and the two are concatenated: one descriptor per stride-8 patch.
2. Memory bank: the patches of the normal training images, subsampled by a documented
   rule: ``random`` (a seeded ``fraction`` of the patches, the default) or ``coreset``
   (greedy k-center on a seeded random projection, PatchCore's rule).
3. Patch score: Euclidean distance to the nearest bank patch. The patch map is upsampled
   (bilinear) to the image size and blurred like ReContrast's maps (Gaussian, sigma 4);
   the image score is the map's max.

This is the ``patchknn`` model kind (:mod:`recontrast_core.models.patchknn`) on a given
encoder, scored through the same head as every detector. With ``BaselineConfig.grid`` (the
default) evaluation uses the strongest setting of the training-free grid instead
(:mod:`recontrast_core.selection`); without it, the encoder and its input statistics come
from the detector being evaluated (its frozen copy: the ImageNet weights, or the adapted
encoder when training started from one), so both see the same pixels.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .config import BaselineConfig, InferenceConfig, PatchKnnConfig
from .models.backbones import Encoder
from .models.patchknn import PatchKnnScorer, fit_patchknn
from .models.patchknn.bank import greedy_coreset, nearest_distances, random_subsample  # noqa: F401 (public)
from .scoring import ScoringHead


def patchknn_settings(settings: BaselineConfig, encoder: Encoder, image_size: int) -> PatchKnnConfig:
    """The baseline's settings as the patchknn kind's (the encoder is given, not named)."""
    return PatchKnnConfig(backbone=encoder.name, image_size=image_size, levels=settings.levels,
                          sampler=settings.sampler, fraction=settings.fraction, seed=settings.seed,
                          projection_dim=settings.projection_dim, batch_size=settings.batch_size)


class PatchBaseline:
    """Fit on normal ``uint8`` images, then score ``uint8`` images: maps and image scores."""

    def __init__(self, encoder: Encoder, settings: BaselineConfig = BaselineConfig(), device: Optional[torch.device] = None):
        if len(encoder.channels) < 3:
            raise ValueError("the baseline needs an encoder with three feature levels")
        self.encoder = encoder.eval()
        self.settings = settings
        self.device = device or next(encoder.parameters()).device
        self.scorer: Optional[PatchKnnScorer] = None
        self.n_train_patches = 0

    @property
    def bank(self) -> Optional[torch.Tensor]:
        return None if self.scorer is None else self.scorer.bank

    @torch.inference_mode()
    def patch_features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """``uint8 [B,3,S,S]`` -> ``float32 [B, C, S/8, S/8]`` patch descriptors."""
        cfg = patchknn_settings(self.settings, self.encoder, int(images_uint8.shape[-1]))
        return PatchKnnScorer(self.encoder, cfg).to(self.device).patch_features(images_uint8.to(self.device))

    def fit(self, images_uint8: torch.Tensor) -> "PatchBaseline":
        if images_uint8.shape[0] == 0:
            raise ValueError("the baseline needs at least one normal training image")
        cfg = patchknn_settings(self.settings, self.encoder, int(images_uint8.shape[-1]))
        self.scorer = fit_patchknn(images_uint8, cfg, self.device, encoder=self.encoder)
        self.n_train_patches = self.scorer.n_train_patches
        return self

    @torch.inference_mode()
    def score(self, images_uint8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``uint8 [N,3,S,S]`` -> (blurred maps ``[N,S,S]`` float32, image scores ``[N]``)."""
        if self.scorer is None:
            raise RuntimeError("PatchBaseline.score called before fit")
        head = ScoringHead(self.scorer, InferenceConfig(gaussian_sigma=self.settings.gaussian_sigma))
        maps, scores = [], []
        for start in range(0, images_uint8.shape[0], self.settings.batch_size):
            m, s = head.maps_and_scores(images_uint8[start:start + self.settings.batch_size].to(self.device))
            maps.append(m.cpu())
            scores.append(s.cpu())
        return torch.cat(maps).numpy(), torch.cat(scores).numpy()
