"""Mean-Shifted Contrastive fine-tuning (Reiss & Hoshen, AAAI 2023).

* center ``c`` = mean of the L2-normalised embeddings of the normal training images,
  computed once with the starting weights;
* mean-shifted feature of an embedding ``z`` (already L2-normalised):
  ``normalize(z - c)``;
* loss = NT-Xent between two augmented views on the mean-shifted features (temperature
  0.25) + ``angular_weight`` * the angular center term ``mean ||z1 - c||^2 + mean
  ||z2 - c||^2`` (the reference code's ``--angular`` option, weight 1, which also
  L2-normalises the center);
* SGD lr 1e-5, weight decay 5e-5; BatchNorm frozen (the encoder stays in eval mode);
  MoCo-v2 views (:class:`~recontrast_core.adapt.views.MocoViews`).

Scoring: kNN (k=2) on the L2-normalised (not shifted) embeddings, see :mod:`.knn`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import AdaptConfig
from ..progress import track_steps
from .embed import Embedder, iter_batches, to_unit, trainable_parameters
from .views import MocoViews


def compute_center(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean of the L2-normalised embeddings ``[N,D]`` -> ``[D]`` (not re-normalised)."""
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError("compute_center needs a non-empty [N,D] tensor")
    return F.normalize(embeddings.float(), dim=1).mean(dim=0)


def mean_shift(z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``normalize(normalize(z) - c)`` row-wise."""
    return F.normalize(F.normalize(z, dim=1) - center.to(z), dim=1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """NT-Xent (SimCLR) of two views ``[B,D]`` (rows are normalised here).

    For each of the 2B anchors: ``-log(exp(s_pos/t) / sum_{j != anchor} exp(s_j/t))``,
    averaged; ``s`` are cosine similarities, the positive is the other view of the image.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"views must both be [B,D], got {tuple(a.shape)} and {tuple(b.shape)}")
    out = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    logits = out @ out.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=out.device), float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(out.device)
    return F.cross_entropy(logits, pos)


def angular_term(z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``mean ||z1 - c||^2 + mean ||z2 - c||^2`` on L2-normalised embeddings."""
    c = center.to(z1)
    return ((z1 - c) ** 2).sum(1).mean() + ((z2 - c) ** 2).sum(1).mean()


def msc_loss(z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor, temperature: float = 0.25,
             angular_weight: float = 0.0) -> torch.Tensor:
    """MSC loss of two views' L2-normalised embeddings ``[B,D]`` around ``center [D]``."""
    c = center.to(z1)
    loss = nt_xent(z1 - c, z2 - c, temperature)  # nt_xent normalises: normalize(z - c)
    if angular_weight:
        loss = loss + angular_weight * angular_term(z1, z2, c)
    return loss


@dataclass
class MSCResult:
    center: torch.Tensor
    history: list[dict] = field(default_factory=list)  # per epoch: {"epoch", "loss"}

    @property
    def final_loss(self) -> Optional[float]:
        return self.history[-1]["loss"] if self.history else None


def train_msc(embedder: Embedder, images_uint8: torch.Tensor, cfg: AdaptConfig, *, progress: bool = True,
              generator: Optional[torch.Generator] = None,
              on_epoch_end: Optional[Callable[[int, float], None]] = None) -> MSCResult:
    """Fine-tune ``embedder.encoder`` in place on normal images ``uint8 [N,3,S,S]``.

    ``on_epoch_end(epoch, mean_loss)`` is called after every epoch (e.g. to evaluate)."""
    n = images_uint8.shape[0]
    if n < 2:
        raise ValueError("MSC needs at least 2 normal images")
    device = embedder.device
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    encoder = embedder.encoder
    encoder.eval()  # BatchNorm frozen: running statistics are never updated
    center = compute_center(embedder.embed(images_uint8)).to(device)
    if cfg.angular_weight:
        center = F.normalize(center, dim=0)  # the reference code's --angular variant
    params = trainable_parameters(encoder, cfg.freeze_levels)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    views = MocoViews(images_uint8.shape[-1], crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, math.ceil(n / batch) - (1 if n % batch == 1 else 0))
    history: list[dict] = []
    with track_steps("msc", cfg.epochs * steps_per_epoch, enabled=progress) as bar:
        for epoch in range(cfg.epochs):
            total, count = 0.0, 0
            for idx in iter_batches(n, batch, gen):
                x = to_unit(images_uint8[idx], device)
                both = embedder.standardize(torch.cat([views(x), views(x)]))
                z = F.normalize(embedder.pooled(both), dim=1)
                z1, z2 = z.chunk(2)
                loss = msc_loss(z1, z2, center, cfg.temperature, cfg.angular_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = float(loss.detach())
                total, count = total + value * idx.numel(), count + idx.numel()
                bar.advance(1, info=f"epoch {epoch + 1} loss {value:.4f}")
            history.append({"epoch": epoch + 1, "loss": total / max(count, 1)})
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, history[-1]["loss"])
                encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(True)
    return MSCResult(center=center.cpu(), history=history)
