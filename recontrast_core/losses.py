"""ReContrast's hard-mined global cosine loss.

``gcos(a, b) = mean_i (1 - cos(flatten(a_i), flatten(b_i)))`` with the target ``a``
detached. Hard mining: the per-pixel channel cosine distance ``d`` is computed without
grad; the gradient flowing into the decoder output is multiplied by 0 where
``d < mean(d) + alpha * std(d)`` (easy pixels). The mask is a multiplication inside a
custom autograd function, not boolean indexing, so it runs without host syncs.

Data-parallel (``distributed=True``, docs/distributed.md): ``mean(d)`` and ``std(d)`` are
taken over the whole global batch (sums all-reduced across the processes), so every
process mines with the threshold one process would use on the whole batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``weight``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad * weight.to(grad.dtype), None


def _global_mean_std(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d.mean()`` and ``d.std()`` (unbiased) over ``d`` on every process (float64 sums)."""
    import torch.distributed as dist

    d64 = d.double()
    stats = torch.stack([d64.sum(), (d64 * d64).sum(), d64.new_tensor(float(d.numel()))])
    dist.all_reduce(stats)
    total, squares, n = stats.unbind()
    mean = total / n
    var = ((squares - total * mean) / (n - 1)).clamp_min(0)
    return mean.to(d.dtype), var.sqrt().to(d.dtype)


def hard_mining_weight(target: torch.Tensor, pred: torch.Tensor, alpha, factor: float = 0.0,
                       distributed: bool = False) -> torch.Tensor:
    """Per-pixel gradient weight [B,1,H,W]: ``factor`` on easy pixels, 1 on hard ones."""
    with torch.no_grad():
        d = 1.0 - F.cosine_similarity(target.float(), pred.float(), dim=1).unsqueeze(1)
        mean, std = _global_mean_std(d) if distributed else (d.mean(), d.std())
        thresh = mean + alpha * std
        hard = (d >= thresh).to(torch.float32)
        return hard + (1.0 - hard) * factor


def global_cosine_hm(targets: Sequence[torch.Tensor], preds: Sequence[torch.Tensor], alpha, factor: float = 0.0,
                     distributed: bool = False) -> torch.Tensor:
    """Sum over levels of the global cosine distance, with hard-mined gradients into ``preds``.
    The mean is over this process's samples: DDP's gradient average makes it the global mean."""
    loss = preds[0].new_zeros((), dtype=torch.float32)
    for target, pred in zip(targets, preds):
        target = target.detach()
        weight = hard_mining_weight(target, pred, alpha, factor, distributed)
        pred = _ScaleGrad.apply(pred, weight)
        cos = F.cosine_similarity(target.float().flatten(1), pred.float().flatten(1), dim=1)
        loss = loss + (1.0 - cos).mean()
    return loss


def recontrast_loss(frozen, feats, head1, head2, alpha, distributed: bool = False) -> torch.Tensor:
    """1/2 gcos(E0, head1) + 1/2 gcos(E, head2), both hard-mined (over the global batch
    when ``distributed``)."""
    return (0.5 * global_cosine_hm(frozen, head1, alpha, distributed=distributed)
            + 0.5 * global_cosine_hm(feats, head2, alpha, distributed=distributed))


def alpha_at(iteration: int, total: int, start: float = -3.0, end: float = 1.0, warmup_fraction: float = 0.1) -> float:
    """Linear ramp from ``start`` to ``end`` over the first ``warmup_fraction`` of training."""
    warmup = max(total * warmup_fraction, 1e-8)
    return min(start + (end - start) * iteration / warmup, end)
