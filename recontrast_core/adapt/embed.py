"""Image embeddings for adaptation and scoring: a global pool of one encoder feature level.

* :class:`Embedder` wraps an :class:`~recontrast_core.models.backbones.Encoder`: ``pooled``
  (with gradients, for training) and ``embed`` (batched, no gradients, L2-normalised, for
  centers and scoring) on ``uint8 [N,3,S,S]`` images.
* :func:`trainable_parameters` freezes the parameters up to and including the stage that
  holds a given feature tap (MSC's reference code freezes ResNet's conv1..layer2).
* :func:`standardize` normalises float images in [0, 1] (augmented views) with the
  encoder's input statistics.
"""

from __future__ import annotations

import re
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.cache import batch_slices
from ..models.backbones import IMAGENET_STATS, Encoder, InputStats

Pool = Literal["avg", "max"]


def standardize(x01: torch.Tensor, stats: InputStats = IMAGENET_STATS) -> torch.Tensor:
    """``float [B,3,H,W]`` in [0, 1] -> normalised with ``stats`` (a new tensor)."""
    mean = torch.tensor(stats.mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(stats.std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def to_unit(images_uint8: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """``uint8 [B,3,H,W]`` -> ``float32`` in [0, 1] on ``device`` (transfer as uint8)."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {images_uint8.dtype}")
    x = images_uint8.to(device) if device is not None else images_uint8
    return x.float().div_(255.0)


def global_pool(fmap: torch.Tensor, pool: Pool = "avg") -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[B,C]``."""
    if pool == "avg":
        return fmap.mean(dim=(2, 3))
    if pool == "max":
        return fmap.amax(dim=(2, 3))
    raise ValueError(f"pool must be 'avg' or 'max', not {pool!r}")


class Embedder:
    """Global-pooled features of one level of ``encoder`` (index into its three levels)."""

    def __init__(
        self,
        encoder: Encoder,
        level: int = -1,
        pool: Pool = "avg",
        device: Optional[torch.device] = None,
        batch_size: int = 64,
    ):
        n = len(encoder.channels)
        if not -n <= level < n:
            raise ValueError(f"level {level} out of range for an encoder with {n} levels")
        self.device = torch.device(device) if device is not None else next(encoder.parameters()).device
        self.encoder = encoder.to(self.device)
        self.level = level
        self.pool = pool
        self.batch_size = int(batch_size)

    def standardize(self, x01: torch.Tensor) -> torch.Tensor:
        """Views in [0, 1] -> the encoder's input statistics."""
        return standardize(x01, self.encoder.stats)

    @property
    def dim(self) -> int:
        return self.encoder.channels[self.level]

    def pooled(self, x_std: torch.Tensor) -> torch.Tensor:
        """Raw pooled features of normalised images (keeps gradients)."""
        amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            feats = self.encoder(x_std)
        return global_pool(feats[self.level].float(), self.pool)

    @torch.no_grad()
    def embed(self, images_uint8: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``uint8 [N,3,S,S]`` -> ``float32 [N,D]`` on the CPU (L2-normalised by default).

        The encoder runs in eval mode (BatchNorm uses its running statistics)."""
        was_training = self.encoder.training
        self.encoder.eval()
        out = []
        try:
            for sl in batch_slices(images_uint8.shape[0], self.batch_size):
                x = self.standardize(to_unit(images_uint8[sl], self.device))
                z = self.pooled(x)
                out.append((F.normalize(z, dim=1) if normalize else z).cpu())
        finally:
            self.encoder.train(was_training)
        if not out:
            return torch.empty(0, self.dim)
        return torch.cat(out)

    @torch.no_grad()
    def embed_views(self, views_01: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings of float views in [0, 1] already on the device."""
        self.encoder.eval()
        out = [F.normalize(self.pooled(self.standardize(views_01[sl])), dim=1).cpu()
               for sl in batch_slices(views_01.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.dim)


def _stage_of(module_name: str) -> str:
    m = re.match(r"^(blocks\.\d+|[^.]+)", module_name)
    return m.group(1) if m else module_name


def trainable_parameters(encoder: Encoder, freeze_levels: int = 0) -> list[nn.Parameter]:
    """Set ``requires_grad`` and return the trainable parameters.

    ``freeze_levels = L`` freezes every parameter registered up to and including the stage
    that holds the tap of feature level ``L`` (1-based; 0 = train everything). timm
    registers parameters in forward order, so "up to" means "before, in the forward pass":
    for ResNets ``L=2`` freezes conv1, bn1, layer1 and layer2 (MSC's reference setting);
    for EfficientNets ``L=2`` freezes the stem and ``blocks.0..2``.
    """
    named = list(encoder.body.named_parameters())
    cut = 0
    if freeze_levels > 0:
        taps = [d["module"] for d in encoder.body.feature_info.get_dicts(keys=("module",))]
        if freeze_levels > len(taps):
            raise ValueError(f"freeze_levels={freeze_levels} but the encoder has {len(taps)} levels")
        stage = _stage_of(taps[freeze_levels - 1])
        hits = [i for i, (name, _) in enumerate(named) if name == stage or name.startswith(stage + ".")]
        cut = (max(hits) + 1) if hits else 0
    for i, (_, p) in enumerate(named):
        p.requires_grad_(i >= cut)
    return [p for _, p in named[cut:]]


def iter_batches(n: int, batch_size: int, generator: torch.Generator, min_size: int = 2) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches; a trailing batch smaller than ``min_size`` is dropped."""
    perm = torch.randperm(n, generator=generator)
    for sl in batch_slices(n, batch_size):
        idx = perm[sl]
        if idx.numel() >= min_size:
            yield idx
