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

``onnx-int8`` / ``openvino-int8`` are the same graph with the ReContrast bottleneck, decoder
and heads quantized to INT8 (onnxruntime static post-training quantization, QDQ, calibrated
on normal training images; the encoders, the map, blur, score and calibration stay fp32):
same input, outputs and metadata, 2x (onnxruntime) to 5x (OpenVINO) faster than torch on
one CPU thread at 256 px for <= 0.0002 AUROC (docs/export.md).

:class:`OnnxDetector` / :class:`OpenVinoDetector` (or :func:`load_exported`) read the files
back and return the same dicts as ``Detector.predict``. onnx, onnxruntime and openvino come
with the ``export`` extra (``pip install 'recontrast[export]'``) and are imported on use.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch

from . import __version__
from .errors import UserError
from .scoring import CalibrationMap, GaussianBlur, ScoringHead, float32_at_or_above, symmetric_pad_index  # noqa: F401

EXPORT_FORMAT = "recontrast-export/1"
FORMATS = ("onnx", "openvino", "onnx-int8", "openvino-int8")
INT8_FORMATS = ("onnx-int8", "openvino-int8")
DEFAULT_CALIBRATION_IMAGES = 128  # training normal images the INT8 ranges are measured on
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
    return _save_onnx(onnx.load(str(path)), path, metadata)


def _save_onnx(proto, path: Path, metadata: dict[str, str]) -> Path:
    """``proto`` with ``metadata`` as its metadata_props, checked, saved to ``path``."""
    onnx = require("onnx")
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "recontrast"
    proto.producer_version = __version__
    proto.doc_string = (f"recontrast anomaly scoring graph ({metadata.get('model_kind', '?')}, "
                        f"{metadata.get('backend', '?')}); see metadata_props (input, mean, std, resize, threshold)")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def export_bundle(bundle_dir: Union[str, Path], out_dir: Union[str, Path], fmt: str = "onnx", *,
                  calibration_data: Optional[Union[str, Path]] = None,
                  calibration_images: int = DEFAULT_CALIBRATION_IMAGES) -> Path:
    """Export the bundle's scoring graph to ``out_dir`` (``model.onnx``, or ``model.xml`` +
    ``model.bin`` for OpenVINO) with ``export.json``; returns the model file.

    ``onnx-int8`` / ``openvino-int8``: the same graph (same input, outputs and metadata) with
    the ReContrast bottleneck, decoder and heads quantized to INT8 (:func:`quantize_onnx`:
    static post-training quantization, ranges measured on up to ``calibration_images`` normal
    training images found at ``calibration_data``: the bundle's dataset root or a folder of
    its normal training images, :func:`find_calibration_images`).

    Raises :class:`UserError` (one line) for an unknown format, a folder that is not a
    bundle, a missing extra, an unwritable ``out_dir`` or missing / unusable calibration
    data, before anything is written."""
    from .bundle import read_bundle_meta
    from .runtime import atomic_write, atomic_write_json, ensure_output_dir

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    int8 = fmt in INT8_FORMATS
    if int8 and calibration_data is None:
        raise UserError(f"--format {fmt} needs --calibration-data PATH: the bundle's dataset root or a folder of "
                        "its normal training images (the INT8 ranges are measured on them)")
    if not int8 and calibration_data is not None:
        raise UserError(f"--calibration-data is for the INT8 formats ({', '.join(INT8_FORMATS)}), not {fmt!r}")
    bundle_meta = read_bundle_meta(Path(bundle_dir))  # not a bundle: one line, nothing else done
    if int8 and bundle_meta.get("model_kind") == "patchknn":
        raise UserError(f"{bundle_dir}: a patchknn bundle has no decoder to quantize (INT8 applies to the ReContrast "
                        "decoder; encoder features stay fp32): export it with --format onnx or openvino")
    require("onnx")
    require("onnxruntime")
    if fmt.startswith("openvino"):
        require("openvino")
    calibration = None
    if int8:
        calibration = find_calibration_images(calibration_data, calibration_images)  # listed, not decoded yet
    out = ensure_output_dir(out_dir, "export folder")
    detector = _load(bundle_dir)
    metadata = export_metadata(detector, Path(bundle_dir), fmt)
    images = None
    if calibration is not None:
        images = load_calibration_images(calibration, detector.image_size)  # a bad file: one line, nothing written
        metadata.update(quantization_metadata(calibration, len(images)))
    # export.json is the completion marker, written last: a failed export (a full disk, a
    # kill) leaves none, and the model files are written beside and renamed into place
    (out / META_FILE).unlink(missing_ok=True)
    if fmt in ("onnx", "onnx-int8"):
        def write(tmp: Path) -> Path:
            if images is None:
                return _write_onnx(detector, tmp, metadata)
            with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as work:
                fp32 = _write_onnx(detector, Path(work) / ONNX_FILE, metadata)
                return _save_onnx(quantize_onnx(fp32, images), tmp, metadata)

        model_path = atomic_write(out / ONNX_FILE, write)
        files = [ONNX_FILE]
    else:
        ov = require("openvino")
        weights = Path(OPENVINO_FILE).with_suffix(".bin").name
        files = [OPENVINO_FILE, weights]

        def write_openvino(xml: Path) -> None:
            with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp:
                onnx_path = _write_onnx(detector, Path(tmp) / ONNX_FILE, metadata)
                if images is not None:  # quantized as ONNX (QDQ), converted: OpenVINO runs it as INT8
                    onnx_path = _save_onnx(quantize_onnx(onnx_path, images), Path(tmp) / "int8.onnx", metadata)
                model = ov.convert_model(str(onnx_path))
                for key, value in metadata.items():
                    model.set_rt_info(value, [RT_INFO_ROOT, key])
                # fp32 weights: OpenVINO compresses them to fp16 by default, which is not the
                # bundle (INT8 weights stay INT8 either way)
                ov.save_model(model, str(Path(tmp) / OPENVINO_FILE), compress_to_fp16=False)
                # the weights into place first, then the graph that names them (atomic_write's rename)
                atomic_write(out / weights, lambda p: os.replace(Path(tmp) / weights, p))
                os.replace(Path(tmp) / OPENVINO_FILE, xml)

        model_path = atomic_write(out / OPENVINO_FILE, write_openvino)
    atomic_write_json(out / META_FILE, {**parse_metadata(metadata), "files": files,
                                        "input_name": INPUT_NAME, "output_names": list(OUTPUT_NAMES)})
    return model_path


# ---------------------------------------------------------------------------------------
# INT8: static post-training quantization of the ReContrast decoder, calibrated on normal images
# ---------------------------------------------------------------------------------------
# Quantized: the ReContrast network's fusion bottleneck, decoder and 1x1 heads (the node
# names the ONNX exporter gives them come from the module path: "/scorer/model/bottleneck/...",
# "/scorer/model/decoder/...", "/scorer/model/head1.0/..."; the fused kind's are under
# "/scorer/recontrast/model/"): ~75% of the fp32 onnxruntime time at 256 px (paper decoder).
# Kept fp32: both encoders (their features are the targets the anomaly map compares the
# decoder's output with; INT8 there cost 0.006 image / 0.007 pixel AUROC on magnetic-tile-dev
# at 256 px, the decoder alone in INT8 nothing measurable: docs/export.md), the input
# normalisation, the 1 - cos maps, upsampling, a patch-kNN branch and its search, the fused
# kind's normalisation, the blur, the image score and the calibration.
_FP32_NETWORKS = ("encoder", "frozen")


def quantized_node(name: str) -> bool:
    """Whether the exported graph's node ``name`` is quantized (INT8): inside a ReContrast
    network ("model" in the module path), not inside one of its two encoders."""
    parts = name.split("/")[1:-1]  # "/scorer/model/decoder/x/Conv" -> ["scorer", "model", "decoder", "x"]
    if len(parts) < 2 or parts[0] != "scorer" or "model" not in parts[1:]:
        return False
    inner = parts[parts.index("model", 1) + 1:]
    return not inner or inner[0] not in _FP32_NETWORKS


@dataclass
class CalibrationSet:
    """The normal training images an INT8 export is calibrated on (found, not yet decoded)."""

    source: Path
    layout: str  # a dataset layout name (its train split, normal images), or "folder"
    manifest: Any  # a recontrast_core.data.manifest.Manifest of the chosen images
    available: int  # normal training images found (``manifest`` holds an even subset)


def find_calibration_images(path: Union[str, Path, None], limit: int = DEFAULT_CALIBRATION_IMAGES) -> CalibrationSet:
    """The calibration images at ``path``: a dataset root in any layout ``recontrast train``
    reads (its normal ``train`` images), or a plain folder of normal images (every image
    below it). At most ``limit`` of them, evenly spaced in path order (deterministic).
    :class:`UserError` (one line) when ``path`` is missing or holds no usable image."""
    from .data.images import is_image_filename
    from .data.layouts.common import _walk
    from .data.layouts.registry import detect_layout, read_dataset
    from .data.manifest import Manifest, ManifestEntry
    from .errors import first_line

    if limit < 1:
        raise UserError(f"--calibration-images must be at least 1, not {limit}")
    hint = "pass the bundle's dataset root or a folder of its normal training images"
    if path is None or str(path).strip() == "":
        raise UserError(f"no calibration data given: {hint}")
    source = Path(path).expanduser()
    if not source.exists():
        raise UserError(f"calibration data {source}: not found; {hint}")
    layout = detect_layout(source)
    if layout is not None:
        try:
            manifest = read_dataset(source, layout).select(split="train", label=0)
        except UserError as exc:
            raise UserError(f"calibration data {source}: {first_line(exc)}") from None
    elif source.is_dir():
        files = [p for p in _walk(source) if p.is_file() and is_image_filename(p)]  # hidden ones skipped, path order
        manifest = Manifest(root=str(source), entries=[ManifestEntry(path=p.relative_to(source).as_posix(), label=0)
                                                       for p in files])
        layout = "folder"
    else:
        raise UserError(f"calibration data {source}: not a folder or a dataset; {hint}")
    available = len(manifest)
    if available == 0:
        what = "no normal training images" if layout != "folder" else "no images"
        raise UserError(f"calibration data {source}: {what} found ({layout} layout); {hint}")
    if available > limit:
        step = available / limit
        manifest = manifest.subset(manifest.entries[int(i * step)] for i in range(limit))
    return CalibrationSet(source=source, layout=layout, manifest=manifest, available=available)


def load_calibration_images(calibration: CalibrationSet, image_size: int) -> np.ndarray:
    """uint8 [N,3,S,S]: the calibration images decoded and resized as for scoring."""
    from .data.cache import load_resized
    from .errors import first_line

    try:
        images = load_resized(calibration.manifest, image_size).images
    except UserError as exc:
        raise UserError(f"calibration data {calibration.source}: {first_line(exc)}") from None
    except (OSError, ValueError) as exc:  # an unreadable image the loader did not name
        raise UserError(f"calibration data {calibration.source}: an image cannot be read "
                        f"({type(exc).__name__}: {first_line(exc)})") from None
    return np.ascontiguousarray(images.numpy())  # load_resized: a uint8 tensor


def quantization_metadata(calibration: CalibrationSet, n_images: int) -> dict[str, str]:
    """The metadata an INT8 export adds to (or replaces in) :func:`export_metadata`'s."""
    ort = require("onnxruntime")
    return {
        "precision": "int8 ReContrast bottleneck, decoder and heads (int8 weights per output channel, uint8 "
                     "activations per tensor); fp32 encoders, anomaly map, blur, score and calibration",
        "quantization": json.dumps({
            "method": "onnxruntime static quantization (QDQ), MinMax calibration",
            "onnxruntime_version": ort.__version__,
            "weights": "int8, symmetric, per output channel",
            "activations": "uint8, asymmetric, per tensor",
            "calibration_data": str(calibration.source.resolve()),
            "calibration_layout": calibration.layout,
            "calibration_images": n_images,
            "calibration_images_available": calibration.available,
            "quantized": "the ReContrast fusion bottleneck, decoder and 1x1 heads; the rest stays fp32",
        }),
    }


def quantize_onnx(fp32_path: Path, images: np.ndarray):
    """The fp32 ONNX graph at ``fp32_path`` with the ReContrast bottleneck, decoder and heads
    quantized (:func:`quantized_node`), calibrated on ``images`` (uint8 [N,3,S,S]); returns
    the ``onnx.ModelProto``.

    onnxruntime's static quantizer in QDQ form: QuantizeLinear / DequantizeLinear pairs
    around every quantized op's inputs and outputs, int8 weights per output channel, uint8
    activations whose ranges are the min / max seen on the calibration images. Standard ONNX
    (opset 17): onnxruntime fuses the pairs into its INT8 kernels (QLinearConv, ...), OpenVINO
    turns them into FakeQuantize and runs INT8 kernels (VNNI / AMX where the CPU has them)."""
    import logging
    import warnings

    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    model = onnx.load(str(fp32_path))
    nodes = [n.name for n in model.graph.node if quantized_node(n.name)]
    if not nodes:
        raise UserError(f"{fp32_path}: nothing to quantize: INT8 applies to a ReContrast decoder (the bundle has none)")

    class _Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.next = 0

        def get_next(self):
            if self.next >= len(images):
                return None
            self.next += 1
            return {INPUT_NAME: np.ascontiguousarray(images[self.next - 1:self.next])}

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=Path(fp32_path).parent) as work:
        out = Path(work) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer's advice ("consider pre-processing") is not the user's
        try:
            with warnings.catch_warnings(), _ort_threads():
                warnings.simplefilter("ignore")
                quantize_static(str(fp32_path), str(out), _Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        return onnx.load(str(out))


@contextmanager
def _ort_threads():
    """The quantizer's calibration runs onnxruntime with its default thread pool (every core);
    give it this process's thread count instead (``OMP_NUM_THREADS``, the CPU quota)."""
    try:
        from onnxruntime.quantization import calibrate
    except ImportError:  # pragma: no cover - the quantizer itself would have failed
        yield
        return
    real = getattr(calibrate, "onnxruntime", None)
    if real is None or not hasattr(real, "SessionOptions"):  # another layout: its defaults
        yield
        return
    threads = torch.get_num_threads()

    class _Runtime:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def SessionOptions():  # noqa: N802 (onnxruntime's name)
            opts = real.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            return opts

    calibrate.onnxruntime = _Runtime()
    try:
        yield
    finally:
        calibrate.onnxruntime = real


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
