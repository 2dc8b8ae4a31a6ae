"""Anomaly maps and image scores, batched and on the model's device.

Map: for all six (target, head) pairs, ``1 - cos`` over channels, bilinear upsample to
the input size, sum; then a Gaussian blur (sigma 4, truncate 4 like scipy's
``gaussian_filter``) as a separable convolution on the same device; image score is the
map's max or the mean of its top ``k`` fraction.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from .config import InferenceConfig
from .data.cache import normalize



def normalize_images(images_uint8: torch.Tensor, device, channels_last: bool = False, stats=None) -> torch.Tensor:
    """uint8 [B,3,H,W] (any device) -> float32 on ``device``, normalised with ``stats``
    (an ``InputStats``: the encoder's ``stats``; ImageNet's when None)."""
    x = normalize(images_uint8, device) if stats is None else normalize(images_uint8, device, mean=stats.mean, std=stats.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def gaussian_kernel1d(sigma: float, device, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    xs = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    return k / k.sum()


def _pad_symmetric(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """scipy's 'reflect' mode (d c b a | a b c d): the edge pixel is repeated."""
    if r <= x.shape[dim]:
        return torch.cat([x.narrow(dim, 0, r).flip(dim), x, x.narrow(dim, x.shape[dim] - r, r).flip(dim)], dim=dim)
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)  # tiny maps: replicate the edge
    return F.pad(x, pad, mode="replicate")


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,H,W] maps, equal to scipy's ``gaussian_filter`` (truncate 4)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = (k.numel() - 1) // 2
    x = maps.unsqueeze(1).float()
    x = F.conv2d(_pad_symmetric(x, r, -1), k.view(1, 1, 1, -1))
    x = F.conv2d(_pad_symmetric(x, r, -2), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def anomaly_map(frozen, feats, head1, head2, size: tuple[int, int]) -> torch.Tensor:
    """Sum of the six per-pixel cosine-distance maps, upsampled to ``size``: [B,H,W] float32."""
    total = None
    for targets, preds in ((frozen, head1), (feats, head2)):
        for t, p in zip(targets, preds):
            d = 1.0 - F.cosine_similarity(t.float(), p.float(), dim=1).unsqueeze(1)
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=True)
            total = d if total is None else total + d
    return total.squeeze(1)


def image_scores(maps: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    flat = maps.flatten(1)
    if cfg.score == "max":
        return flat.amax(dim=1)
    k = max(1, int(math.ceil(flat.shape[1] * cfg.topk_fraction)))
    return flat.topk(k, dim=1).values.mean(dim=1)


@torch.inference_mode()
def predict_batch(model, images: torch.Tensor, cfg: InferenceConfig, amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [B,3,H,W] on the model's device -> (blurred maps [B,H,W], scores [B])."""
    device_type = images.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        frozen, feats, head1, head2 = model(images)
    maps = anomaly_map(frozen, feats, head1, head2, tuple(images.shape[-2:]))
    maps = gaussian_blur(maps, cfg.gaussian_sigma)
    return maps, image_scores(maps, cfg)
