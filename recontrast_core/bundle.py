"""The model bundle: one directory that scores new images on its own.

Layout::

    bundle/
      model.safetensors   every tensor of the detector: the ReContrast model (frozen copy
                          included), the patch-kNN encoder and memory bank, or both (fused)
      bundle.json         format, library version, model_kind, the kind's settings (full
                          TrainConfig; patchknn / fusion settings), InferenceConfig,
                          preprocessing, calibration (threshold + normalisation), dataset
                          fingerprint, training summary, selection (model.kind auto)

Loading needs no network: the kind's scorer is rebuilt from the settings with random
weights and then every tensor is read from ``model.safetensors`` (strict). Bundles written
before model kinds existed have no ``model_kind`` and load as ``recontrast``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from . import __version__
from .calibration import Calibration, CalibrationFieldError, decide, normalise
from .config import InferenceConfig, TrainConfig
from .errors import UserError, first_line
from .data.cache import batch_slices
from .models.kinds import get_kind
from .models.recontrast import ReContrast, ReContrastScorer
from .runtime import amp_dtype_for, fsync_path, honour_umask, note_output, load_json, read_safetensors, resolve_device, staged_write
from .scoring import ScoringHead

BUNDLE_FORMAT = "recontrast-bundle/1"
DEFAULT_KIND = "recontrast"  # bundles without model_kind
# Settings older bundles recorded that no longer exist (they never changed the model).
RETIRED_TRAIN_KEYS = ("num_workers",)
from .filenames import BUNDLE_META_FILE as META_FILE  # noqa: E402
from .filenames import BUNDLE_WEIGHTS_FILE as WEIGHTS_FILE  # noqa: E402


def _input_stats_of(scorer: nn.Module) -> dict:
    if isinstance(scorer, ReContrastScorer):
        stats = scorer.model.encoder.stats
    elif hasattr(scorer, "encoder"):
        stats = scorer.encoder.stats
    else:  # fused: the patch-kNN branch's here, the ReContrast branch's in recontrast_preprocessing
        stats = scorer.patchknn.encoder.stats
    return {"mean": list(stats.mean), "std": list(stats.std)}


def save_bundle(
    out_dir: Path,
    model: Union[ReContrast, nn.Module],
    cfg: Optional[TrainConfig],
    inference: InferenceConfig,
    calibration: Calibration,
    *,
    dataset_fingerprint: Optional[str] = None,
    training: Optional[dict] = None,
    selection: Optional[dict] = None,
) -> Path:
    """Write the bundle into ``out_dir`` atomically (a temp dir renamed into place).

    ``model``: a kind's scorer, or a bare :class:`ReContrast` (wrapped at ``cfg.image_size``).
    ``cfg``: the ReContrast settings (None for a training-free kind)."""
    scorer = ReContrastScorer(model, cfg.image_size) if isinstance(model, ReContrast) else model
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_bundle_files(tmp, scorer, cfg, inference, calibration, dataset_fingerprint, training, selection)
        if out_dir.exists():  # the old bundle is moved aside, not deleted, until the new one is in place
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
        fsync_path(out_dir.parent, directory=True)
        note_output(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_bundle_files(tmp: Path, scorer, cfg, inference, calibration, dataset_fingerprint, training,
                        selection) -> None:
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in scorer.bundle_state().items()}
    staged_write(tmp / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
    honour_umask(tmp / WEIGHTS_FILE)  # safetensors writes 0600
    meta = {
        "format": BUNDLE_FORMAT,
        "library_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_kind": scorer.kind,
        "train_config": cfg.model_dump(mode="json") if cfg is not None else None,
        "inference": inference.model_dump(mode="json"),
        "preprocessing": {
            "image_size": scorer.image_size,
            "resize": "square, PIL bilinear with antialias",
            "color": "RGB (grayscale replicated, alpha dropped, 16-bit scaled >> 8)",
            **_input_stats_of(scorer),
        },
        **scorer.bundle_meta(),
        "calibration": calibration.to_dict(),
        "dataset_fingerprint": dataset_fingerprint,
        "training": training or {},
        **({"selection": selection} if selection else {}),
    }
    if isinstance(scorer, ReContrastScorer):
        meta["channels"] = list(scorer.model.encoder.channels)
    text = json.dumps(meta, indent=2)
    staged_write(tmp / META_FILE, lambda p: p.write_text(text))


def read_bundle_meta(bundle_dir: Path) -> dict:
    bundle_dir = Path(bundle_dir)
    meta_path = bundle_dir / META_FILE
    if not meta_path.is_file() or not (bundle_dir / WEIGHTS_FILE).is_file():
        raise UserError(f"{bundle_dir}: not a model bundle (expected {META_FILE} and {WEIGHTS_FILE})")
    meta = load_json(meta_path, lambda p, why: UserError(f"{p}: {why.replace('invalid JSON', 'not valid JSON')}"))
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{meta_path}: unsupported bundle format {meta.get('format')!r}")
    return meta


@dataclass
class Detector:
    """A loaded bundle: ``predict`` takes image paths or arrays and returns scores and decisions.

    ``scorer`` is the kind's module (:mod:`recontrast_core.models.kinds`); every kind scores
    through the same :class:`~recontrast_core.scoring.ScoringHead` (blur, image score), the
    module the export traces. ``config`` is the ReContrast settings (None for patchknn)."""

    scorer: nn.Module
    config: Optional[TrainConfig]
    inference: InferenceConfig
    calibration: Optional[Calibration]
    meta: dict
    device: torch.device
    kind: str = DEFAULT_KIND
    head: ScoringHead = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.head = ScoringHead(self.scorer, self.inference).to(self.device).eval()
        for rc in self._recontrast_scorers():
            rc.amp_dtype = self.scoring_dtype

    def _recontrast_scorers(self) -> list:
        if isinstance(self.scorer, ReContrastScorer):
            return [self.scorer]
        inner = getattr(self.scorer, "recontrast", None)
        return [inner] if isinstance(inner, ReContrastScorer) else []

    @property
    def model(self) -> ReContrast:
        """The ReContrast network (recontrast and fused kinds)."""
        found = self._recontrast_scorers()
        if not found:
            raise AttributeError(f"a {self.kind} detector has no ReContrast network")
        return found[0].model

    @property
    def image_size(self) -> int:
        return int(self.scorer.image_size)

    @property
    def scoring_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype for the ReContrast network (None = fp32), from ``inference.precision``."""
        p = self.inference.precision
        if p == "fp32" or self.config is None:
            return None
        if p == "bf16":
            return torch.bfloat16
        return amp_dtype_for(self.device, self.config.amp)

    @property
    def fingerprint(self) -> Optional[str]:
        return self.meta.get("dataset_fingerprint")

    @torch.inference_mode()
    def score_uint8(self, images: torch.Tensor, batch_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N,3,S,S] -> (maps [N,S,S] float32, scores [N]) as numpy."""
        maps, scores = [], []
        channels_last = bool(self.config is not None and self.config.channels_last and self.kind == "recontrast")
        for chunk in batch_slices(images.shape[0], batch_size or self.inference.batch_size):
            x = images[chunk].to(self.device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            m, s = self.head.maps_and_scores(x)
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


def load_detector(bundle_dir: Union[str, Path], device: str = "auto") -> Detector:
    """Load a bundle; every problem with its files is a one-line :class:`UserError` naming
    the file and the field (no traceback, nothing scored)."""
    bundle_dir = Path(bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    meta_path, weights_path = bundle_dir / META_FILE, bundle_dir / WEIGHTS_FILE
    kind_name = meta.get("model_kind", DEFAULT_KIND)
    if not isinstance(kind_name, str):
        raise UserError(f"{meta_path}: invalid model_kind {kind_name!r}")
    try:
        kind = get_kind(kind_name)
    except UserError as exc:
        raise UserError(f"{meta_path}: {exc}") from None
    needs_train = kind_name in ("recontrast", "fused")
    required = ("inference", "calibration") + (("train_config",) if needs_train else ())
    missing = [k for k in required if not isinstance(meta.get(k), dict)]
    if missing:
        raise UserError(f"{meta_path}: missing or invalid {', '.join(missing)}")
    cfg = None
    try:
        if needs_train:
            train_config = {k: v for k, v in meta["train_config"].items() if k not in RETIRED_TRAIN_KEYS}
            cfg = TrainConfig.model_validate(train_config)
        inference = InferenceConfig.model_validate(meta["inference"])
    except ValueError as exc:
        raise UserError(f"{meta_path}: invalid settings ({_first_error(exc)})") from None
    try:
        calibration = Calibration.from_dict(meta["calibration"])
    except (TypeError, ValueError, ArithmeticError) as exc:
        detail = f"calibration.{exc}" if isinstance(exc, CalibrationFieldError) else _first_error(exc)
        raise UserError(f"{meta_path}: invalid calibration ({detail})") from None
    check_bundle_numbers(meta, meta_path)
    state = read_safetensors(weights_path, "model weights")
    try:
        scorer = kind.load(meta, state, cfg)
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise UserError(f"{meta_path}: invalid {kind_name} settings ({_first_error(exc)})") from None
    except RuntimeError as exc:
        raise UserError(f"{weights_path}: the weights do not fit the model in {META_FILE} "
                        f"({_first_error(exc)})") from None
    dev = resolve_device(device)
    scorer.to(dev).eval()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    if cfg is not None and cfg.channels_last and kind_name == "recontrast":
        scorer.to(memory_format=torch.channels_last)
    return Detector(scorer=scorer, config=cfg, inference=inference, calibration=calibration, meta=meta, device=dev,
                    kind=kind_name)


# Input statistics a bundle records, where the kinds read them: "preprocessing" (every kind;
# the ReContrast network's), "input_stats" (patch-kNN's encoder), "recontrast_preprocessing"
# (the fused kind's ReContrast branch).
_STATS_FIELDS = ("preprocessing", "input_stats", "recontrast_preprocessing")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(float(value))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_bundle_numbers(meta: dict, meta_path: Path) -> None:
    """The numbers of ``bundle.json`` the scorer is rebuilt from, checked before they are
    used: input statistics (3 finite numbers each, std > 0), image sizes and the bank size
    (whole numbers > 0), the fusion quantiles (finite). One :class:`UserError` naming
    ``bundle.json`` and the field; nothing is loaded."""

    def bad(field: str, expected: str, value: Any) -> UserError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(f"{meta_path}: {field}: expected {expected}, got {shown}")

    for name in _STATS_FIELDS:
        block = meta.get(name)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise bad(name, "an object (mean, std, ...)", block)
        for key in ("mean", "std"):
            if key not in block:
                continue
            v = block[key]
            if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)):
                raise bad(f"{name}.{key}", "3 finite numbers", v)
            if key == "std" and not all(x > 0 for x in v):
                raise bad(f"{name}.{key}", "3 numbers > 0", v)
        if "image_size" in block and not _whole(block["image_size"]):
            raise bad(f"{name}.image_size", "a whole number > 0", block["image_size"])
    if "bank_size" in meta and not _whole(meta["bank_size"]):
        raise bad("bank_size", "a whole number > 0", meta["bank_size"])
    fusion = meta.get("fusion")
    if isinstance(fusion, dict):
        for key in ("recontrast_q", "patchknn_q"):
            if key in fusion and not (isinstance(fusion[key], list) and len(fusion[key]) == 2
                                      and all(_is_number(x) for x in fusion[key])):
                raise bad(f"fusion.{key}", "2 finite numbers (q_lo, q_hi)", fusion[key])
        for key in ("recontrast_image_size", "patchknn_image_size"):
            if key in fusion and not _whole(fusion[key]):
                raise bad(f"fusion.{key}", "a whole number > 0", fusion[key])


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
    return first_line(exc)
