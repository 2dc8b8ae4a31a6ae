"""The registry of model kinds: how each kind's scorer is rebuilt from a bundle.

A kind is a folder under ``recontrast_core/models/`` holding its network or memory bank, its
loss or fit, and its scorer: an ``nn.Module`` whose ``forward`` maps ``[N,3,S,S]`` images in
0..255 to the raw anomaly map ``[N,S,S]`` and which knows ``image_size``, ``bundle_state()``
(tensors for ``model.safetensors``) and ``bundle_meta()`` (JSON for ``bundle.json``). The
shared scoring head (:mod:`recontrast_core.scoring`) blurs, scores and calibrates any of them,
in torch and in the exported graph alike. Adding a kind: its folder, one
:func:`register_kind` call below, and its fit in :mod:`recontrast_core.fit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..config import TrainConfig
from ..registries import Registry


@dataclass(frozen=True)
class ModelKind:
    name: str
    summary: str
    # (bundle meta, safetensors state, TrainConfig or None) -> the scorer
    load: Callable[[dict, dict, Optional[TrainConfig]], nn.Module]
    trains: bool  # needs a training run (else a single pass over the training images)


KINDS: Registry[ModelKind] = Registry("model kind")


def register_kind(kind: ModelKind) -> ModelKind:
    return KINDS.add(kind)


def get_kind(name: str) -> ModelKind:
    return KINDS.lookup(name)


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_recontrast(meta: dict, state: dict, cfg: Optional[TrainConfig]) -> nn.Module:
    from .backbones import InputStats
    from .recontrast import ReContrastScorer, build_model

    if cfg is None:
        raise ValueError("train_config: missing (a recontrast bundle needs its TrainConfig)")
    model = build_model(cfg, weights="none")
    model.load_state_dict(state, strict=True)
    pre = meta.get("preprocessing") or {}
    if "mean" in pre and "std" in pre:  # the statistics the bundle was trained with
        model.encoder.stats = model.frozen.stats = InputStats(tuple(pre["mean"]), tuple(pre["std"]))
    return ReContrastScorer(model, cfg.image_size)


def _load_patchknn(meta: dict, state: dict, cfg: Optional[TrainConfig]) -> nn.Module:
    from .patchknn import PatchKnnScorer

    return PatchKnnScorer.from_bundle(meta, state)


def _load_fused(meta: dict, state: dict, cfg: Optional[TrainConfig]) -> nn.Module:
    from ..config import FusionConfig
    from .fused import FusedScorer

    fusion = meta["fusion"]
    recontrast = _load_recontrast({"preprocessing": meta.get("recontrast_preprocessing") or {}},
                                  _prefixed(state, "recontrast."), cfg)
    patchknn = _load_patchknn(meta, _prefixed(state, "patchknn."), cfg)
    q = torch.tensor([fusion["recontrast_q"], fusion["patchknn_q"]], dtype=torch.float32)
    cfg_fusion = FusionConfig.model_validate({k: fusion[k] for k in FusionConfig.model_fields if k in fusion})
    return FusedScorer(recontrast, patchknn, cfg_fusion, q)


register_kind(ModelKind("recontrast", "ReContrast: trained encoder + frozen copy, bottleneck, two-headed decoder",
                        _load_recontrast, trains=True))
register_kind(ModelKind("patchknn", "patch-kNN: frozen backbone patches against a memory bank (training-free)",
                        _load_patchknn, trains=False))
register_kind(ModelKind("fused", "ReContrast and patch-kNN maps, each quantile-normalised, summed",
                        _load_fused, trains=True))
