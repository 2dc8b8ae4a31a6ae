"""The model bundle: one directory that scores new images on its own.

Layout::

    bundle/
      model.safetensors   every tensor of the ReContrast model (frozen copy included)
      bundle.json         format, library version, full TrainConfig, InferenceConfig,
                          preprocessing, calibration (threshold + normalisation),
                          dataset fingerprint, training summary

Loading needs no network: the architecture is rebuilt from the config with random
weights and then every tensor is read from ``model.safetensors`` (strict).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from . import __version__
from .calibration import Calibration, decide, normalise
from .config import BackboneConfig, InferenceConfig, TrainConfig
from .errors import UserError, first_line
from .data.cache import batch_slices
from .inference import normalize_images, predict_batch
from .models import build_model
from .models.backbones import InputStats
from .models.recontrast import ReContrast
from .runtime import amp_dtype_for, atomic_write, read_safetensors, resolve_device

BUNDLE_FORMAT = "recontrast-bundle/1"
# Settings older bundles recorded that no longer exist (they never changed the model).
RETIRED_TRAIN_KEYS = ("num_workers",)
from .filenames import BUNDLE_META_FILE as META_FILE  # noqa: E402
from .filenames import BUNDLE_WEIGHTS_FILE as WEIGHTS_FILE  # noqa: E402



def save_bundle(
    out_dir: Path,
    model: ReContrast,
    cfg: TrainConfig,
    inference: InferenceConfig,
    calibration: Calibration,
    *,
    dataset_fingerprint: Optional[str] = None,
    training: Optional[dict] = None,
) -> Path:
    """Write the bundle into ``out_dir`` atomically (a temp dir renamed into place)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    meta = {
        "format": BUNDLE_FORMAT,
        "library_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_config": cfg.model_dump(mode="json"),
        "inference": inference.model_dump(mode="json"),
        "preprocessing": {
            "image_size": cfg.image_size,
            "resize": "square, PIL bilinear with antialias",
            "color": "RGB (grayscale replicated, alpha dropped, 16-bit scaled >> 8)",
            "mean": list(model.encoder.stats.mean),
            "std": list(model.encoder.stats.std),
        },
        "calibration": calibration.to_dict(),
        "channels": list(model.encoder.channels),
        "dataset_fingerprint": dataset_fingerprint,
        "training": training or {},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def read_bundle_meta(bundle_dir: Path) -> dict:
    bundle_dir = Path(bundle_dir)
    meta_path = bundle_dir / META_FILE
    if not meta_path.is_file() or not (bundle_dir / WEIGHTS_FILE).is_file():
        raise UserError(f"{bundle_dir}: not a model bundle (expected {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{meta_path}: unsupported bundle format {meta.get('format')!r}")
    return meta


@dataclass
class Detector:
    """A loaded bundle: ``predict`` takes image paths or arrays and returns scores and decisions."""

    model: ReContrast
    config: TrainConfig
    inference: InferenceConfig
    calibration: Calibration
    meta: dict
    device: torch.device

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def scoring_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype for scoring (None = fp32), from ``inference.precision``."""
        p = self.inference.precision
        if p == "fp32":
            return None
        if p == "bf16":
            return torch.bfloat16
        return amp_dtype_for(self.device, self.config.amp)

    @property
    def fingerprint(self) -> Optional[str]:
        return self.meta.get("dataset_fingerprint")

    def score_uint8(self, images: torch.Tensor, batch_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N,3,S,S] -> (maps [N,S,S] float32, scores [N]) as numpy."""
        maps, scores = [], []
        amp = self.scoring_dtype
        for chunk in batch_slices(images.shape[0], batch_size or self.inference.batch_size):
            x = normalize_images(images[chunk], self.device, self.config.channels_last, self.model.encoder.stats)
            m, s = predict_batch(self.model, x, self.inference, amp)
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
        return torch.cat(maps).numpy(), torch.cat(scores).numpy()

    def predict(self, images: Iterable[Union[str, Path, np.ndarray]], return_map: bool = False) -> list[dict[str, Any]]:
        """Image paths or arrays (HxW / HxWxC; uint8, uint16 or float) -> score, normalised score, decision."""
        arrays = [to_model_input(img, self.image_size) for img in images]
        if not arrays:
            return []
        return self.predict_uint8(torch.from_numpy(np.stack(arrays)), return_map)

    def predict_uint8(self, batch: torch.Tensor, return_map: bool = False) -> list[dict[str, Any]]:
        """Preprocessed uint8 [N,3,S,S] (see :func:`to_model_input`) -> one result dict per image."""
        maps, scores = self.score_uint8(batch)
        return result_rows(maps, scores, normalise(scores, self.calibration), decide(scores, self.calibration),
                           return_map)


def result_rows(maps, scores, norm, flags, return_map: bool = False) -> list[dict[str, Any]]:
    """One ``{"score", "normalized_score", "decision"[, "anomaly_map"]}`` dict per image:
    the result format every scorer (torch, ONNX, OpenVINO) returns."""
    out = []
    for i in range(len(scores)):
        row = {"score": float(scores[i]), "normalized_score": float(norm[i]), "decision": bool(flags[i])}
        if return_map:
            row["anomaly_map"] = maps[i]
        out.append(row)
    return out


def to_model_input(image: Union[str, Path, np.ndarray], size: int) -> np.ndarray:
    """A path or an array (HxW, HxWxC; uint8, uint16 or float) -> uint8 [3,S,S], as in training."""
    from PIL import Image

    from .data.cache import resize_image
    from .data.images import load_image_rgb, to_rgb_array

    if isinstance(image, (str, Path)):
        rgb = load_image_rgb(image)
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        elif arr.dtype == np.uint16 and arr.ndim == 2:
            pass  # PIL mode I;16
        elif arr.dtype != np.uint8:
            raise UserError(f"unsupported image array dtype {arr.dtype} (use uint8, uint16 or float)")
        try:
            rgb = to_rgb_array(Image.fromarray(arr))
        except (TypeError, ValueError) as exc:
            raise UserError(f"unsupported image array of shape {arr.shape}: {exc}") from exc
    return np.ascontiguousarray(resize_image(rgb, size).transpose(2, 0, 1))


def set_input_stats(model: ReContrast, meta: dict) -> None:
    """Use the statistics the bundle was trained with (bundles written before statistics
    were a backbone setting recorded ImageNet's here, and were trained with them)."""
    pre = meta.get("preprocessing") or {}
    if "mean" in pre and "std" in pre:
        stats = InputStats(tuple(pre["mean"]), tuple(pre["std"]))
        model.encoder.stats = model.frozen.stats = stats


def load_detector(bundle_dir: Union[str, Path], device: str = "auto") -> Detector:
    """Load a bundle; every problem with its files is a one-line :class:`UserError` naming
    the file and the field (no traceback, nothing scored)."""
    bundle_dir = Path(bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    meta_path, weights_path = bundle_dir / META_FILE, bundle_dir / WEIGHTS_FILE
    missing = [k for k in ("train_config", "inference", "calibration") if not isinstance(meta.get(k), dict)]
    if missing:
        raise UserError(f"{meta_path}: missing or invalid {', '.join(missing)}")
    train_config = {k: v for k, v in meta["train_config"].items() if k not in RETIRED_TRAIN_KEYS}
    try:
        cfg = TrainConfig.model_validate(train_config)
        inference = InferenceConfig.model_validate(meta["inference"])
    except ValueError as exc:
        raise UserError(f"{meta_path}: invalid settings ({_first_error(exc)})") from None
    try:
        calibration = Calibration.from_dict(meta["calibration"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"{meta_path}: invalid calibration ({_first_error(exc)})") from None
    model = build_model(cfg, weights="none")
    state = read_safetensors(weights_path, "model weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{weights_path}: the weights do not fit the model in {META_FILE} "
                        f"({_first_error(exc)})") from None
    set_input_stats(model, meta)
    dev = resolve_device(device)
    model.to(dev).eval()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return Detector(model=model, config=cfg, inference=inference, calibration=calibration, meta=meta, device=dev)


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
    return first_line(exc)
