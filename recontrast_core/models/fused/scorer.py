"""The ``fused`` scorer: the ReContrast map and the patch-kNN map, each normalised by
quantiles of its own maps on held-out normal images, summed.

EfficientAD's rule (Batzner et al. 2024): for each map, ``q_lo`` (its 0.9 quantile over the
normal images' pixels) goes to 0 and ``q_hi`` (its 0.995 quantile) to 0.1, linearly; the two
normalised maps are added. The two branches may run at different resolutions: the bundle's
input size ``S`` is the larger one; a branch at a smaller size gets the image downscaled
inside the graph by fixed resize matrices (bilinear with antialiasing, the weights of
``torch.nn.functional.interpolate(..., antialias=True)``; two matrix products, exportable),
and its map is upsampled (bilinear) back to ``S``.

The image score comes from the fused map unless ``fusion.image_score`` names a branch: then
the scorer returns ``(fused map, that branch's normalised map)`` and the scoring head takes the
image score from the second (blurred the same way), the anomaly map from the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import FusionConfig

SPAN = 0.1  # q_hi maps to this (EfficientAD)


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_in, n_out]`` weights of an antialiased bilinear resize along one axis."""
    eye = torch.eye(n_in, dtype=torch.float64).view(1, 1, n_in, n_in)
    out = F.interpolate(eye, size=(n_in, n_out), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].float()


class Resize(nn.Module):
    """``[N,3,S,S]`` -> ``[N,3,s,s]`` by fixed matrices (identity when ``s == S``)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.identity = n_in == n_out
        w = resize_matrix(n_in, n_out) if not self.identity else torch.ones(1, 1)
        self.register_buffer("w", w, persistent=False)  # [S, s]
        self.register_buffer("wt", w.T.contiguous(), persistent=False)  # [s, S]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.identity:
            return x
        return torch.matmul(torch.matmul(self.wt, x), self.w)


class FusedScorer(nn.Module):
    kind = "fused"

    def __init__(self, recontrast: nn.Module, patchknn: nn.Module, fusion: FusionConfig,
                 quantiles: torch.Tensor | None = None):
        super().__init__()
        self.recontrast, self.patchknn, self.fusion = recontrast, patchknn, fusion
        self.image_size = max(recontrast.image_size, patchknn.image_size)
        self.resize_r = Resize(self.image_size, recontrast.image_size)
        self.resize_p = Resize(self.image_size, patchknn.image_size)
        # [2, 2]: (q_lo, q_hi) of the recontrast map, then of the patch-kNN map
        q = quantiles if quantiles is not None else torch.tensor([[0.0, 1.0], [0.0, 1.0]])
        self.register_buffer("quantiles", q.float().clone(), persistent=False)

    def branch_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two raw maps at ``S`` (before normalisation)."""
        size = (self.image_size, self.image_size)
        maps = []
        for branch, resize in ((self.recontrast, self.resize_r), (self.patchknn, self.resize_p)):
            m = branch(resize(images))
            if branch.image_size != self.image_size:
                m = F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
            maps.append(m.float())
        return maps[0], maps[1]

    def normalised_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two maps at ``S``, each mapped q_lo -> 0, q_hi -> ``SPAN``."""
        r, p = self.branch_maps(images)
        q = self.quantiles
        r = (r - q[0, 0]) * (SPAN / (q[0, 1] - q[0, 0]))
        p = (p - q[1, 0]) * (SPAN / (q[1, 1] - q[1, 0]))
        return r, p

    def forward(self, images: torch.Tensor):
        r, p = self.normalised_maps(images)
        source = self.fusion.image_score
        if source == "fused":
            return r + p
        return r + p, (p if source == "patchknn" else r)

    def bundle_state(self) -> dict[str, torch.Tensor]:
        state = {f"recontrast.{k}": v for k, v in self.recontrast.bundle_state().items()}
        state.update({f"patchknn.{k}": v for k, v in self.patchknn.bundle_state().items()})
        return state

    def bundle_meta(self) -> dict:
        q = self.quantiles.tolist()
        return {"fusion": {**self.fusion.model_dump(mode="json"), "recontrast_q": q[0], "patchknn_q": q[1],
                           "recontrast_image_size": self.recontrast.image_size,
                           "patchknn_image_size": self.patchknn.image_size},
                "recontrast_preprocessing": {"mean": list(self.recontrast.model.encoder.stats.mean),
                                             "std": list(self.recontrast.model.encoder.stats.std)},
                **self.patchknn.bundle_meta()}


@torch.no_grad()
def fit_quantiles(scorer: FusedScorer, normal_images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Set and return the branches' (q_lo, q_hi) from normal ``uint8 [N,3,S,S]`` images."""
    import numpy as np

    from ...data.cache import batch_slices

    dev = scorer.quantiles.device
    rs, ps = [], []
    for sl in batch_slices(normal_images.shape[0], batch_size):
        r, p = scorer.branch_maps(normal_images[sl].to(dev))
        rs.append(r.cpu().numpy().ravel())
        ps.append(p.cpu().numpy().ravel())
    out = []
    for values in (np.concatenate(rs), np.concatenate(ps)):
        lo, hi = np.quantile(values.astype(np.float64), [scorer.fusion.q_lo, scorer.fusion.q_hi])
        if not hi > lo:  # a flat map: keep the scale finite
            hi = lo + max(1e-6, abs(lo) * 1e-6)
        out.append([float(lo), float(hi)])
    scorer.quantiles = torch.tensor(out, dtype=torch.float32, device=dev)
    return scorer.quantiles
