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

The encoder and its input statistics come from the detector being evaluated (its frozen
copy: the ImageNet weights, or the adapted encoder when training started from one), so
both see the same pixels.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import BaselineConfig
from .data.cache import batch_slices
from .inference import gaussian_blur, normalize_images
from .models.backbones import Encoder

def nearest_distances(bank: torch.Tensor, queries: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row: ``[Q]`` float32.

    The nearest row is found with chunked ``|b|^2 - 2 q.b`` (one matrix product; memory
    ``chunk x len(bank)``), then its distance is recomputed exactly as ``|q - b|``, which
    avoids the expansion's cancellation error for near-identical rows."""
    bank = bank.float()
    b2 = (bank * bank).sum(1)
    out = []
    for sl in batch_slices(queries.shape[0], chunk):
        q = queries[sl].float()
        nearest = (b2.unsqueeze(0) - 2.0 * q @ bank.T).argmin(dim=1)
        out.append((q - bank[nearest]).norm(dim=1))
    return torch.cat(out) if out else torch.empty(0)


def random_subsample(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of a seeded random ``fraction`` of ``n`` rows (at least one)."""
    k = max(1, int(round(n * fraction)))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def greedy_coreset(features: torch.Tensor, fraction: float, seed: int = 0, projection_dim: int = 128) -> torch.Tensor:
    """PatchCore's greedy k-center selection on a seeded random projection of ``features``."""
    n = features.shape[0]
    k = max(1, int(round(n * fraction)))
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim and x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / projection_dim**0.5
        x = x @ proj.to(x.device)
    first = int(torch.randint(0, n, (1,), generator=g))
    chosen = [first]
    mind = torch.cdist(x, x[first : first + 1]).squeeze(1)
    for _ in range(k - 1):
        nxt = int(mind.argmax())
        chosen.append(nxt)
        mind = torch.minimum(mind, torch.cdist(x, x[nxt : nxt + 1]).squeeze(1))
    return torch.tensor(sorted(chosen))


class PatchBaseline:
    """Fit on normal ``uint8`` images, then score ``uint8`` images: maps and image scores."""

    def __init__(self, encoder: Encoder, settings: BaselineConfig = BaselineConfig(), device: Optional[torch.device] = None):
        if len(encoder.channels) < 3:
            raise ValueError("the baseline needs an encoder with three feature levels")
        self.encoder = encoder.eval()
        self.settings = settings
        self.device = device or next(encoder.parameters()).device
        self.bank: Optional[torch.Tensor] = None
        self.n_train_patches = 0

    @torch.inference_mode()
    def patch_features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """``uint8 [B,3,S,S]`` -> ``float32 [B, C, S/8, S/8]`` patch descriptors."""
        x = normalize_images(images_uint8, self.device, stats=self.encoder.stats)
        feats = self.encoder(x)
        a, b = (feats[i].float() for i in self.settings.levels)
        a = F.avg_pool2d(a, 3, stride=1, padding=1)
        b = F.avg_pool2d(b, 3, stride=1, padding=1)
        b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([a, b], dim=1)

    def _patches(self, images_uint8: torch.Tensor):
        for sl in batch_slices(images_uint8.shape[0], self.settings.batch_size):
            f = self.patch_features(images_uint8[sl])
            yield f, f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])

    def fit(self, images_uint8: torch.Tensor) -> "PatchBaseline":
        if images_uint8.shape[0] == 0:
            raise ValueError("the baseline needs at least one normal training image")
        patches = torch.cat([p for _, p in self._patches(images_uint8)])
        self.n_train_patches = patches.shape[0]
        s = self.settings
        if s.sampler == "coreset":
            idx = greedy_coreset(patches, s.fraction, s.seed, s.projection_dim)
        elif s.sampler == "random":
            idx = random_subsample(patches.shape[0], s.fraction, s.seed).to(patches.device)
        else:
            raise ValueError(f"sampler must be 'random' or 'coreset', not {s.sampler!r}")
        self.bank = patches[idx.to(patches.device)].contiguous()
        return self

    @torch.inference_mode()
    def score(self, images_uint8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``uint8 [N,3,S,S]`` -> (blurred maps ``[N,S,S]`` float32, image scores ``[N]``)."""
        if self.bank is None:
            raise RuntimeError("PatchBaseline.score called before fit")
        size = tuple(images_uint8.shape[-2:])
        maps, scores = [], []
        for f, p in self._patches(images_uint8):
            d = nearest_distances(self.bank, p).view(f.shape[0], 1, f.shape[2], f.shape[3])
            m = F.interpolate(d, size=size, mode="bilinear", align_corners=False).squeeze(1)
            m = gaussian_blur(m, self.settings.gaussian_sigma)
            maps.append(m.cpu())
            scores.append(m.flatten(1).amax(1).cpu())
        return torch.cat(maps).numpy(), torch.cat(scores).numpy()
