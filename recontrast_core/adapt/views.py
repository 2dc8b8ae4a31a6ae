"""MoCo-v2 style augmented views with ``torchvision.transforms.v2`` on tensors.

RandomResizedCrop(scale), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale
p=0.2, GaussianBlur p=0.5, horizontal flip (MSC / MoCo v2). The blur's sigma range is
MoCo's (0.1, 2.0) at 224 px scaled to the image size, the kernel covers +-3 sigma.
Each image of a batch gets its own random parameters (v2 would otherwise share one draw
across a batched tensor); randomness comes from torch's global generator, so
``seed_everything`` makes a run repeatable.
"""

from __future__ import annotations

import math

import torch


class MocoViews:
    """``float [B,3,S,S]`` in [0, 1] -> one augmented view per image, same shape."""

    def __init__(self, size: int, crop_scale: tuple[float, float] = (0.2, 1.0), jitter: float = 0.4,
                 hue: float = 0.1, hflip: bool = True):
        from torchvision.transforms import v2  # imported on first use (slow import)

        sig_hi = max(0.1, 2.0 * size / 224.0)
        sig_lo = min(0.1, sig_hi)
        kernel = 2 * math.ceil(3 * sig_hi) + 1
        self.size = int(size)
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
            v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, hue)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(sig_lo, sig_hi))], p=0.5),
            v2.RandomHorizontalFlip(p=0.5 if hflip else 0.0),
        ])

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.ndim != 4 or x01.shape[1] != 3:
            raise ValueError(f"expected [B,3,H,W] images, got {tuple(x01.shape)}")
        return torch.stack([self.transform(img) for img in x01]).clamp_(0.0, 1.0)
