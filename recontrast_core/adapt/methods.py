"""The registry of adaptation methods: how :func:`~recontrast_core.adapt.run_adapt` trains each.

Adding a method: its module in this package (a ``train_<name>(embedder, images, cfg,
progress=..., generator=...)`` returning a result with ``history`` and ``final_loss``), one
:func:`register_method` call below, and the name in ``AdaptConfig.method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..registries import Registry
from .coft import train_coft
from .msc import train_msc


@dataclass(frozen=True)
class AdaptMethod:
    name: str
    summary: str
    # (embedder, images [N,3,S,S], resolved AdaptConfig, progress=, generator=) -> result
    # (``history``, ``final_loss``; ``center`` when the method has one)
    train: Callable[..., Any]
    min_images: int = 1
    too_few: str = ""  # the error when fewer than min_images normal training images are given
    lists_images: bool = False  # encoder.json lists the images used even without shots
    # result -> the "center" written to encoder.json (None: the method has none)
    center: Optional[Callable[[Any], Optional[list]]] = None


METHODS: Registry[AdaptMethod] = Registry(
    "adaptation method", unknown=lambda name: f"adaptation needs a method: {' or '.join(METHODS)}, not {name!r}")


def register_method(method: AdaptMethod) -> AdaptMethod:
    return METHODS.add(method)


def get_method(name: Optional[str]) -> AdaptMethod:
    return METHODS.lookup(name)


register_method(AdaptMethod(
    "msc", "Mean-Shifted Contrastive fine-tuning on the normal training images, kNN scoring",
    train_msc, min_images=2,
    too_few="MSC needs at least 2 normal training images (use --method coft for 1 shot)",
    center=lambda result: result.center.tolist(),
))
register_method(AdaptMethod(
    "coft", "COFT-AD few-shot fine-tuning with synthesised anomalies as negatives, Mahalanobis scoring",
    train_coft, lists_images=True,
))
