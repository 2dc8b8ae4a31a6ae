"""Contrastive adaptation of the encoder before ReContrast training.

* ``method="msc"``: Mean-Shifted Contrastive fine-tuning on the normal training images
  (:mod:`.msc`), kNN scoring (:mod:`.knn`).
* ``method="coft"``: COFT-AD few-shot fine-tuning on ``shots`` normal images with
  synthesised anomalies as negatives (:mod:`.coft`, :mod:`.synth`), Mahalanobis scoring.

The methods are registered in :mod:`.methods` (``register_method`` / ``get_method``).

:func:`run_adapt` is the step function (CLI ``recontrast adapt``, the pipeline's adapt
step): it writes

* ``encoder.safetensors``: the state_dict of ``Encoder.body`` (the keys
  :func:`~recontrast_core.models.backbones.create_encoder` produces), readable by
  ``read_state_dict`` + ``load_encoder_state`` and by ``train_model(init_encoder=...)``;
* ``encoder.json``: format, method, backbone config, all settings, the MSC center, loss
  history and final loss, the images used (shots), wall time and device.

The scorers (:class:`~.knn.KNNScorer`, :class:`~.coft.MahalanobisScorer`) fit on normal
images or shots and score test images (the benchmarks use them). See docs/adaptation.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..config import AdaptConfig, BackboneConfig
from ..data.manifest import Manifest
from ..errors import UserError
from .coft import COFTResult, GaussianModel, MahalanobisScorer, coft_loss, train_coft
from .embed import Embedder, trainable_parameters
from .knn import KNNScorer, knn_scores
from .methods import METHODS, AdaptMethod, get_method, register_method
from .msc import MSCResult, compute_center, mean_shift, msc_loss, nt_xent, train_msc
from .shots import sample_shots
from .synth import cut_paste, noise_blob, scar, synthesize

from ..filenames import ENCODER_FILE  # noqa: E402
from ..filenames import ENCODER_META_FILE as META_FILE  # noqa: E402
ADAPTED_FORMAT = "recontrast-adapted-encoder/1"

__all__ = [
    "run_adapt", "load_adapted", "AdaptedEncoder", "sample_shots",
    "Embedder", "KNNScorer", "MahalanobisScorer", "GaussianModel", "knn_scores",
    "train_msc", "msc_loss", "nt_xent", "compute_center", "mean_shift", "MSCResult",
    "train_coft", "coft_loss", "COFTResult", "synthesize", "cut_paste", "scar", "noise_blob",
    "trainable_parameters", "ENCODER_FILE", "META_FILE",
    "AdaptMethod", "METHODS", "get_method", "register_method",
]


def _training_images(manifest: Manifest, cfg: AdaptConfig) -> Manifest:
    normal = manifest.select(split="train", label=0)
    if len(normal) == 0:
        raise UserError(f"{manifest.root}: no normal training images in the manifest")
    if cfg.shots is not None:
        return sample_shots(manifest, cfg.shots, cfg.shots_seed)
    return normal


def run_adapt(manifest: Manifest, cfg: AdaptConfig, out_dir: Union[str, Path], progress: bool = True) -> Path:
    """Adapt the encoder on the manifest's normal training images (or ``cfg.shots`` of them)
    and write ``encoder.safetensors`` + ``encoder.json`` into ``out_dir``; returns the
    safetensors path. COFT without ``shots`` uses every normal training image as a shot."""
    from ..data.cache import load_resized
    from ..models.backbones import create_encoder
    from ..runtime import resolve_device, seed_everything

    method = get_method(cfg.method)
    cfg = cfg.resolved()
    rows = _training_images(manifest, cfg)
    if len(rows) < method.min_images:
        raise UserError(method.too_few)
    device = resolve_device(cfg.device)
    gen = seed_everything(cfg.seed)
    images, _, _ = load_resized(rows, cfg.image_size, with_masks=False, progress=progress)
    encoder = create_encoder(cfg.backbone)
    embedder = Embedder(encoder, cfg.level, cfg.pool, device, batch_size=cfg.batch_size)
    t0 = time.perf_counter()
    result = method.train(embedder, images, cfg, progress=progress, generator=gen)
    center = method.center(result) if method.center is not None else None
    wall = time.perf_counter() - t0
    meta = {
        "format": ADAPTED_FORMAT,
        "method": cfg.method,
        "backbone": cfg.backbone.model_dump(mode="json"),
        "settings": cfg.model_dump(mode="json"),
        "embedding": {"level": cfg.level, "pool": cfg.pool, "dim": embedder.dim},
        "center": center,
        "final_loss": result.final_loss,
        "history": result.history,
        "n_images": len(rows),
        "images": [e.path for e in rows.entries] if cfg.shots is not None or method.lists_images else None,
        "dataset_fingerprint": manifest.fingerprint,
        "wall_time_s": round(wall, 2),
        "device": str(device),
    }
    return save_adapted(encoder, meta, out_dir)


def save_adapted(encoder, meta: dict, out_dir: Union[str, Path]) -> Path:
    """Write ``encoder.safetensors`` (``Encoder.body`` state_dict) and ``encoder.json`` atomically."""
    from safetensors.torch import save_file

    from ..runtime import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.body.state_dict().items()}
    path = atomic_write(out / ENCODER_FILE, lambda tmp: save_file(state, str(tmp)))
    atomic_write(out / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return path


@dataclass
class AdaptedEncoder:
    encoder: "torch.nn.Module"
    meta: dict
    path: Path

    @property
    def settings(self) -> AdaptConfig:
        return AdaptConfig.model_validate(self.meta["settings"])


def load_adapted(path: Union[str, Path]) -> AdaptedEncoder:
    """An adapted encoder (file or adapt output folder) with its ``encoder.json``."""
    from ..models.backbones import create_encoder

    p = Path(path)
    if p.is_dir():
        p = p / ENCODER_FILE
    meta_path = p.with_name(META_FILE)
    from ..runtime import load_json

    meta = load_json(meta_path, lambda mp, problem: UserError(f"{mp}: cannot read the adapted encoder's metadata: "
                                                            f"{problem}"))
    if not isinstance(meta, dict) or not isinstance(meta.get("backbone"), dict):
        raise UserError(f"{meta_path}: not an adapted encoder's metadata (no backbone)")
    backbone = BackboneConfig.model_validate(meta["backbone"]).model_copy(update={"weights": str(p)})
    return AdaptedEncoder(create_encoder(backbone), meta, p)
