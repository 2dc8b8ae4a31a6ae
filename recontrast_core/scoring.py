"""The one scoring head: what torch inference runs and what the export traces.

Any model kind's scorer (:mod:`recontrast_core.models.kinds`: images 0..255 -> raw map, or
(raw map, the raw map the image score is taken from)) ->
Gaussian blur (the bundle's sigma, truncate 4, scipy ``reflect`` edges, as a fixed index
gather and two fixed 1-D convolutions: exportable) -> image score (max, or the mean of the
top-k, k fixed by the size) -> the calibration's piecewise-linear normalisation and the
decision ``score >= threshold``, in float32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import InferenceConfig
from .inference import gaussian_kernel1d, image_scores

# The largest float32 below 0.5 (calibration's _BELOW_HALF, in the graph's precision).
_BELOW_HALF_F32 = float(np.nextafter(np.float32(0.5), np.float32(0.0)))


def symmetric_pad_index(n: int, r: int) -> torch.Tensor:
    """Indices that pad a length-``n`` axis by ``r`` on each side exactly as
    :func:`recontrast_core.inference.gaussian_blur` does: scipy ``reflect`` (d c b a | a b c d,
    the edge repeated) when ``r <= n``, else the edge replicated."""
    if r <= n:
        idx = list(range(r - 1, -1, -1)) + list(range(n)) + list(range(n - 1, n - 1 - r, -1))
    else:
        idx = [0] * r + list(range(n)) + [n - 1] * r
    return torch.tensor(idx, dtype=torch.long)


class GaussianBlur(nn.Module):
    """The blur of :func:`recontrast_core.inference.gaussian_blur` on [N,H,W] maps of a fixed
    size, as exportable ops: a gather with fixed indices (the reflect padding) and a fixed
    1-D convolution, once along the width and once along the height."""

    def __init__(self, sigma: float, size: int):
        super().__init__()
        self.enabled = sigma > 0
        k = gaussian_kernel1d(sigma, "cpu") if self.enabled else torch.ones(1)
        r = (k.numel() - 1) // 2
        self.register_buffer("kernel_w", k.view(1, 1, 1, -1).clone(), persistent=False)
        self.register_buffer("kernel_h", k.view(1, 1, -1, 1).clone(), persistent=False)
        self.register_buffer("index", symmetric_pad_index(size, r), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return maps
        x = maps.unsqueeze(1)
        x = F.conv2d(torch.index_select(x, 3, self.index), self.kernel_w)
        x = F.conv2d(torch.index_select(x, 2, self.index), self.kernel_h)
        return x[:, 0]


def float32_at_or_above(value: float) -> float:
    """The smallest float32 >= ``value`` (a float32 score passes it iff it passes ``value``)."""
    v = np.float32(value)
    if float(v) < value:
        v = np.nextafter(v, np.float32(np.inf))
    return float(v)


class CalibrationMap(nn.Module):
    """:func:`recontrast_core.calibration.normalise` and ``decide`` in float32:
    score [N] -> (normalized [N]: lo -> 0, threshold -> 0.5, hi -> 1, clipped; decision [N])."""

    def __init__(self, calibration):
        super().__init__()
        cal = calibration
        self.threshold = float32_at_or_above(cal.threshold)
        self.lo = float(np.float32(cal.lo))
        # the slopes in float64, rounded once to float32 constants
        self.below_scale = float(np.float32(0.5 / (cal.threshold - cal.lo)))
        self.above_scale = float(np.float32(0.5 / (cal.hi - cal.threshold)))

    def forward(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decision = score >= self.threshold
        below = torch.clamp((score - self.lo) * self.below_scale, max=_BELOW_HALF_F32)
        above = (score - self.threshold) * self.above_scale + 0.5
        return torch.clamp(torch.where(decision, above, below), 0.0, 1.0), decision


class ScoringHead(nn.Module):
    """A scorer with the blur, the image score and (optionally) the calibration:
    images [N,3,S,S] 0..255 -> (anomaly_map [N,S,S], score [N][, normalized_score, decision])."""

    def __init__(self, scorer: nn.Module, inference: InferenceConfig, calibration=None):
        super().__init__()
        self.scorer = scorer
        self.size = int(scorer.image_size)
        self.inference = inference
        self.blur = GaussianBlur(inference.gaussian_sigma, self.size)
        self.calibration = CalibrationMap(calibration) if calibration is not None else None

    def maps_and_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.scorer(images)
        # a scorer returns its map, or (map, the map its image score comes from): the fused kind
        amap, score_map = out if isinstance(out, tuple) else (out, None)
        maps = self.blur(amap.float())
        score_maps = maps if score_map is None else self.blur(score_map.float())
        return maps, image_scores(score_maps, self.inference)

    def forward(self, images: torch.Tensor):
        maps, score = self.maps_and_scores(images)
        if self.calibration is None:
            return maps, score
        normalized, decision = self.calibration(score)
        return maps, score, normalized, decision


__all__ = ["CalibrationMap", "GaussianBlur", "ScoringHead", "float32_at_or_above", "symmetric_pad_index"]
