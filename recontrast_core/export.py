"""Export a bundle's whole scoring graph to ONNX or OpenVINO, and score with the exported files.

The exported graph is everything :meth:`recontrast_core.bundle.Detector.predict` does after
:func:`~recontrast_core.bundle.to_model_input` (decode, RGB, square resize), in fp32:

``image`` uint8 [N,3,S,S] RGB (resized by the caller, 0..255)
  -> /255, (x - mean) / std (the bundle's input statistics)
  -> both encoder copies, fusion bottleneck, decoder, the two 1x1 heads
  -> the six (target, head) ``1 - cos`` maps, bilinear upsample to S (align_corners), summed
  -> Gaussian blur (the bundle's sigma, truncate 4, scipy ``reflect`` edges): two fixed
     1-D convolutions, the edge padding a fixed index gather (no flip, no data-dependent ops)
  -> ``anomaly_map`` float32 [N,S,S]
  -> ``score`` float32 [N]: the map's max, or the mean of its top-k (k fixed at export)
  -> ``normalized_score`` float32 [N]: the calibration's piecewise-linear map
     (lo -> 0, threshold -> 0.5, hi -> 1, clipped)
  -> ``decision`` bool [N]: ``score >= threshold`` (equivalently ``normalized_score >= 0.5``)

The batch axis is dynamic; the image size is fixed (the bundle's). Why uint8 in: it is
exactly what :func:`to_model_input` produces, so the only preprocessing left to a caller is
"decode, RGB, resize to SxS (PIL bilinear, antialiased)", and the input statistics cannot be
applied twice or forgotten. The preprocessing, the calibration and the versions are written
into the model (ONNX ``metadata_props``; OpenVINO ``rt_info`` under ``recontrast``) and into
``export.json`` beside it.

The threshold is stored in the graph as the smallest float32 >= the bundle's float64
threshold, so for a float32 score the graph's decision equals the bundle's
``score >= threshold`` exactly.

:class:`OnnxDetector` / :class:`OpenVinoDetector` (or :func:`load_exported`) read the files
back and return the same dicts as ``Detector.predict``. onnx, onnxruntime and openvino come
with the ``export`` extra (``pip install 'recontrast[export]'``) and are imported on use.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch

from . import __version__
from .errors import UserError
from .scoring import CalibrationMap, GaussianBlur, ScoringHead, float32_at_or_above, symmetric_pad_index  # noqa: F401

EXPORT_FORMAT = "recontrast-export/1"
FORMATS = ("onnx", "openvino")
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"  # + model.bin
META_FILE = "export.json"
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score", "normalized_score", "decision")
OPSET = 17
EXTRA = "export"
RT_INFO_ROOT = "recontrast"  # OpenVINO rt_info section holding the metadata


class MissingExportDependency(UserError):
    """onnx / onnxruntime / openvino is not installed: names the extra to install."""


def require(module: str):
    """Import ``module`` or raise a one-line :class:`MissingExportDependency` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExportDependency(
            f"{module} is not installed: exporting and scoring exported models need the "
            f"'{EXTRA}' extra (pip install 'recontrast[{EXTRA}]'); {type(exc).__name__}: {exc}"
        ) from None


# ---------------------------------------------------------------------------------------
# the graph: the scoring head torch inference runs (recontrast_core.scoring), with calibration
# ---------------------------------------------------------------------------------------
def ScoringGraph(detector) -> ScoringHead:
    """A loaded :class:`~recontrast_core.bundle.Detector` as one fp32 module:
    uint8 [N,3,S,S] -> (anomaly_map [N,S,S], score [N], normalized_score [N], decision [N])."""
    return ScoringHead(detector.scorer, detector.inference, detector.calibration).eval()


# ---------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------
def export_metadata(detector, bundle_dir: Path, fmt: str) -> dict[str, str]:
    """What a consumer needs to feed and read the exported graph: string values (JSON for
    structured ones), written as ONNX metadata_props / OpenVINO rt_info / export.json."""
    meta = detector.meta
    pre = meta.get("preprocessing") or {}
    cal = detector.calibration
    size = detector.image_size
    values: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "backend": fmt,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(Path(bundle_dir).resolve()),
        "bundle_format": meta.get("format"),
        "bundle_library_version": meta.get("library_version"),
        "bundle_created": meta.get("created"),
        "dataset_fingerprint": meta.get("dataset_fingerprint"),
        "model_kind": detector.kind,
        "backbone": _backbones(detector),
        "image_size": size,
        "input": f"{INPUT_NAME}: uint8 [N,3,{size},{size}] RGB, 0..255, already resized; "
                 "the normalisation below is inside the graph",
        "resize": pre.get("resize", "square, PIL bilinear with antialias"),
        "color": pre.get("color", "RGB (grayscale replicated, alpha dropped, 16-bit scaled >> 8)"),
        "normalisation": "x / 255, then (x - mean) / std per channel (inside the graph)",
        "mean": pre.get("mean"),
        "std": pre.get("std"),
        **({"recontrast_mean": meta["recontrast_preprocessing"]["mean"],
            "recontrast_std": meta["recontrast_preprocessing"]["std"]} if "recontrast_preprocessing" in meta else {}),
        "outputs": {
            "anomaly_map": f"float32 [N,{size},{size}], blurred (sigma {detector.inference.gaussian_sigma})",
            "score": f"float32 [N], {_score_rule(detector.inference, size)}",
            "normalized_score": "float32 [N] in [0, 1]; 0.5 = the threshold",
            "decision": "bool [N]: score >= threshold",
        },
        "inference": detector.inference.model_dump(mode="json"),
        "precision": "fp32",
        "threshold": repr(cal.threshold),
        "threshold_float32": repr(float32_at_or_above(cal.threshold)),
        "calibration": cal.to_dict(),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _backbones(detector) -> str:
    names = []
    if detector.config is not None:
        names.append(detector.config.backbone.name)
    if "patchknn" in detector.meta:
        names.append(detector.meta["patchknn"]["backbone"])
    return " + ".join(names)


def _score_rule(inference, size: int) -> str:
    if inference.score == "max":
        return "the map's max"
    k = max(1, int(math.ceil(size * size * inference.topk_fraction)))
    return f"mean of the map's top {k} values (top {inference.topk_fraction:g})"


def parse_metadata(values: dict[str, str]) -> dict[str, Any]:
    """The metadata strings back to values (JSON where it parses, else the string)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError, RecursionError):  # a string, or hostile metadata
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------
def _load(bundle_dir) -> Any:
    from .bundle import load_detector

    detector = load_detector(bundle_dir, device="cpu")
    detector.scorer.to(memory_format=torch.contiguous_format).float().eval()
    return detector


def _write_onnx(detector, path: Path, metadata: dict[str, str], opset: int = OPSET) -> Path:
    """Trace the :class:`ScoringGraph` to ``path`` (dynamic batch) and attach ``metadata``."""
    onnx = require("onnx")
    graph = ScoringGraph(detector).eval()
    size = detector.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings: shapes read as Python ints are constants in the graph, which is
        # right here (the image size is fixed; the batch axis is dynamic by dynamic_axes).
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "recontrast"
    proto.producer_version = __version__
    proto.doc_string = f"recontrast anomaly scoring graph ({detector.kind}); see metadata_props (input, mean, std, resize, threshold)"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def export_bundle(bundle_dir: Union[str, Path], out_dir: Union[str, Path], fmt: str = "onnx") -> Path:
    """Export the bundle's scoring graph to ``out_dir`` (``model.onnx``, or ``model.xml`` +
    ``model.bin`` for OpenVINO) with ``export.json``; returns the model file. Raises
    :class:`UserError` (one line) for an unknown format, a folder that is not a bundle, a
    missing extra or an unwritable ``out_dir``, before any work."""
    from .bundle import read_bundle_meta
    from .runtime import atomic_write, atomic_write_json, ensure_output_dir, honour_umask

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    read_bundle_meta(Path(bundle_dir))  # not a bundle: one line, nothing else done
    require("onnx")
    require("onnxruntime")
    if fmt == "openvino":
        require("openvino")
    out = ensure_output_dir(out_dir, "export folder")
    detector = _load(bundle_dir)
    metadata = export_metadata(detector, Path(bundle_dir), fmt)
    # export.json is the completion marker, written last: a failed export (a full disk, a
    # kill) leaves none, and the model files are written beside and renamed into place
    (out / META_FILE).unlink(missing_ok=True)
    if fmt == "onnx":
        model_path = atomic_write(out / ONNX_FILE, lambda tmp: _write_onnx(detector, tmp, metadata))
        files = [ONNX_FILE]
    else:
        ov = require("openvino")
        files = [OPENVINO_FILE, Path(OPENVINO_FILE).with_suffix(".bin").name]
        with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp:
            onnx_path = _write_onnx(detector, Path(tmp) / ONNX_FILE, metadata)
            model = ov.convert_model(str(onnx_path))
            for key, value in metadata.items():
                model.set_rt_info(value, [RT_INFO_ROOT, key])
            # fp32 weights: OpenVINO compresses them to fp16 by default, which is not the bundle
            ov.save_model(model, str(Path(tmp) / OPENVINO_FILE), compress_to_fp16=False)
            for name in reversed(files):  # the weights first, then the graph that names them
                honour_umask(Path(tmp) / name)
                os.replace(Path(tmp) / name, out / name)
        model_path = out / OPENVINO_FILE
    atomic_write_json(out / META_FILE, {**parse_metadata(metadata), "files": files,
                                        "input_name": INPUT_NAME, "output_names": list(OUTPUT_NAMES)})
    return model_path


# ---------------------------------------------------------------------------------------
# scoring with the exported files
# ---------------------------------------------------------------------------------------
class _ExportedDetector:
    """Common part: preprocessing (``to_model_input``), batching, result dicts."""

    metadata: dict[str, Any]
    batch_size: int = 16

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_uint8(self, images: Union[np.ndarray, torch.Tensor], batch_size: Optional[int] = None):
        """uint8 [N,3,S,S] -> (maps [N,S,S], scores [N], normalized [N], decisions [N]) as numpy."""
        from .data.cache import batch_slices

        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (3, self.image_size, self.image_size):
            raise UserError(f"expected uint8 [N,3,{self.image_size},{self.image_size}], got {arr.dtype} {list(arr.shape)}")
        parts = [self.run(np.ascontiguousarray(arr[s])) for s in batch_slices(arr.shape[0], batch_size or self.batch_size)]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))

    def predict(self, images: Iterable[Union[str, Path, np.ndarray]], return_map: bool = False) -> list[dict[str, Any]]:
        """Image paths or arrays -> ``{"score", "normalized_score", "decision"}`` per image
        (+ ``anomaly_map``), as :meth:`recontrast_core.bundle.Detector.predict`."""
        from .bundle import to_model_input

        arrays = [to_model_input(img, self.image_size) for img in images]
        if not arrays:
            return []
        return self.predict_uint8(np.stack(arrays), return_map)

    def predict_uint8(self, batch, return_map: bool = False) -> list[dict[str, Any]]:
        maps, scores, norm, flags = self.score_uint8(batch)
        from .bundle import result_rows

        return result_rows(maps, scores, norm, flags, return_map)


def _model_file(path: Union[str, Path], name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise UserError(f"{path}: exported model not found (expected {name} from `recontrast export`)")
    return path


class OnnxDetector(_ExportedDetector):
    """Scores with ``model.onnx`` (a file or its export folder) through onnxruntime (CPU)."""

    def __init__(self, path: Union[str, Path], threads: Optional[int] = None, batch_size: int = 16):
        ort = require("onnxruntime")
        self.path = _model_file(path, ONNX_FILE)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # corrupt or foreign file: one line
            raise UserError(f"{self.path}: not a loadable ONNX model ({type(exc).__name__})") from None
        self.metadata = parse_metadata(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("format") != EXPORT_FORMAT:
            raise UserError(f"{self.path}: not a recontrast export (metadata format {self.metadata.get('format')!r})")
        self.batch_size = batch_size

    def run(self, batch: np.ndarray):
        return tuple(self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch}))


class OpenVinoDetector(_ExportedDetector):
    """Scores with ``model.xml`` (a file or its export folder) through OpenVINO on the CPU,
    fp32 (OpenVINO would otherwise pick bf16 on CPUs that have it)."""

    def __init__(self, path: Union[str, Path], threads: Optional[int] = None, batch_size: int = 16,
                 device: str = "CPU"):
        ov = require("openvino")
        self.path = _model_file(path, OPENVINO_FILE)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:
            raise UserError(f"{self.path}: not a loadable OpenVINO model ({type(exc).__name__})") from None
        self.metadata = parse_metadata(_rt_info(model))
        if self.metadata.get("format") != EXPORT_FORMAT:
            raise UserError(f"{self.path}: not a recontrast export (rt_info format {self.metadata.get('format')!r})")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, device, config)
        self.outputs = [self.compiled.output(name) for name in OUTPUT_NAMES]
        self.request = self.compiled.create_infer_request()
        self.batch_size = batch_size

    def run(self, batch: np.ndarray):
        result = self.request.infer({INPUT_NAME: batch})
        return tuple(np.array(result[o]) for o in self.outputs)


def _rt_info(model) -> dict[str, str]:
    if not model.has_rt_info([RT_INFO_ROOT]):
        return {}
    section = model.get_rt_info([RT_INFO_ROOT])
    data = section.astype(dict) if hasattr(section, "astype") else dict(section)
    return {str(k): str(v.astype(str) if hasattr(v, "astype") else v) for k, v in data.items()}


def load_exported(path: Union[str, Path], **kwargs) -> _ExportedDetector:
    """An :class:`OnnxDetector` or :class:`OpenVinoDetector` for an export folder or model file."""
    path = Path(path)
    if path.suffix == ".onnx" or (path.is_dir() and (path / ONNX_FILE).is_file()):
        return OnnxDetector(path, **kwargs)
    if path.suffix == ".xml" or (path.is_dir() and (path / OPENVINO_FILE).is_file()):
        return OpenVinoDetector(path, **kwargs)
    raise UserError(f"{path}: no exported model ({ONNX_FILE} or {OPENVINO_FILE}) found")
