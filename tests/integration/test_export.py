"""Exported scoring graphs against the bundle, on real magnetic-tile images.

A tiny bundle (64 px, 2 iterations, one block per decoder stage, CPU) trained on a small
subset of magnetic-tile-dev (skipped where the data is absent) is exported to ONNX and
OpenVINO; the 10 test images of the subset are scored with the bundle (torch, fp32),
onnxruntime and OpenVINO. Tolerances (docs/export.md has the measured figures):

* anomaly maps: max |diff| <= 1e-4 x the maps' range (measured ~1e-5 or less);
* scores: relative 1e-5 (measured ~2e-7), or 1e-5 of the maps' range for scores near 0
  (the fused kind's);
* normalized scores: the graph computes them in float32 with lo and the threshold rounded
  to float32, so they may differ from ``calibration.normalise`` (float64) of the same score
  by the normalisation's slope x one float32 step of the score (+1e-6), and from the
  bundle's by slope x (|score diff| + one step) + 1e-6;
* decisions: identical.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from recontrast_core.bundle import load_detector
from recontrast_core.calibration import decide, normalise
from recontrast_core.config import BackboneConfig, TrainConfig
from recontrast_core.data.layouts import read_mvtec
from recontrast_core.train import train_model

pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install 'recontrast[export]')")
pytest.importorskip("openvino", reason="the export extra is not installed (pip install 'recontrast[export]')")

from recontrast_core.export import (  # noqa: E402
    META_FILE,
    OnnxDetector,
    OpenVinoDetector,
    export_bundle,
    load_exported,
)

pytestmark = pytest.mark.timeout(300)

SMALL = dict(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
             device="cpu", log_every=1, checkpoint_every=2)
MAP_TOL = 1e-4  # of the maps' range
SCORE_RTOL = 1e-5


def _train(tiny_tile: Path, out: Path, backbone: BackboneConfig) -> Path:
    return train_model(read_mvtec(tiny_tile), TrainConfig(backbone=backbone, **SMALL), out, progress=False).bundle_dir


def _test_images(tiny_tile: Path) -> list[Path]:
    images = sorted(p for p in (tiny_tile / "test").rglob("*") if p.is_file())
    assert len(images) == 10
    return images


def parity(reference: list[dict], exported: list[dict], calibration) -> dict:
    """The measured differences between the bundle's results and an exported model's."""
    maps_ref = np.stack([r["anomaly_map"] for r in reference])
    maps = np.stack([r["anomaly_map"] for r in exported])
    s_ref = np.array([r["score"] for r in reference])
    s = np.array([r["score"] for r in exported])
    n_ref = np.array([r["normalized_score"] for r in reference])
    n = np.array([r["normalized_score"] for r in exported])
    slope = max(0.5 / (calibration.threshold - calibration.lo), 0.5 / (calibration.hi - calibration.threshold))
    # the graph holds lo and threshold as float32: each is off by up to one float32 step of
    # the scores, which the normalisation multiplies by its slope
    ulp = float(np.spacing(np.float32(np.abs(s_ref).max())))
    return {
        "map_max_abs": float(np.abs(maps - maps_ref).max()),
        "map_rel_range": float(np.abs(maps - maps_ref).max() / (maps_ref.max() - maps_ref.min())),
        "score_max_rel": float((np.abs(s - s_ref) / np.abs(s_ref)).max()),
        "score_max_abs": float(np.abs(s - s_ref).max()),
        # fused scores are sums of offset maps and may sit near 0, where a relative error is
        # ill-conditioned: measured against the maps' range instead
        "score_rel_range": float(np.abs(s - s_ref).max() / (maps_ref.max() - maps_ref.min())),
        "normalized_max_abs": float(np.abs(n - n_ref).max()),
        "normalized_bound": float(slope * (np.abs(s - s_ref).max() + ulp) + 1e-6),
        "normalized_vs_own_score": float(np.abs(n - normalise(s.astype(np.float32), calibration)).max()),
        "normalized_own_bound": float(slope * ulp + 1e-6),
        "slope": float(slope),
        "decisions_equal": [r["decision"] for r in reference] == [r["decision"] for r in exported],
        "own_decisions_equal": list(decide(s.astype(np.float32), calibration)) == [r["decision"] for r in exported],
        "threshold_margin_rel": float(np.abs(s_ref - calibration.threshold).min() / abs(calibration.threshold)),
    }


def check_parity(name: str, reference: list[dict], exported: list[dict], calibration) -> dict:
    p = parity(reference, exported, calibration)
    print(f"\n{name}: " + json.dumps(p), file=sys.stderr)
    assert p["map_rel_range"] <= MAP_TOL, p
    assert p["score_max_rel"] <= SCORE_RTOL or p["score_rel_range"] <= SCORE_RTOL, p
    assert p["normalized_vs_own_score"] <= p["normalized_own_bound"], p
    assert p["normalized_max_abs"] <= p["normalized_bound"], p
    assert p["own_decisions_equal"], p
    assert p["decisions_equal"], p
    return p


def _export_and_compare(bundle: Path, tmp_path: Path, images: list[Path], label: str):
    det = load_detector(bundle, device="cpu")
    assert det.scoring_dtype is None  # fp32 on the CPU: the reference
    reference = det.predict(images, return_map=True)
    onnx_path = export_bundle(bundle, tmp_path / f"{label}-onnx", "onnx")
    ov_path = export_bundle(bundle, tmp_path / f"{label}-openvino", "openvino")
    # batch size 3 over 10 images: batches of 3, 3, 3 and 1 through the dynamic batch axis
    for backend, exported in (("onnxruntime", OnnxDetector(onnx_path, threads=1, batch_size=3)),
                              ("openvino", OpenVinoDetector(ov_path, threads=1, batch_size=3))):
        check_parity(f"{label} {backend}", reference, exported.predict(images, return_map=True), det.calibration)
    return det, onnx_path, ov_path


def test_lite0_exports_faithfully_to_onnx_and_openvino(tiny_tile, tmp_path):
    bundle = _train(tiny_tile, tmp_path / "run", BackboneConfig(name="tf_efficientnet_lite0"))
    images = _test_images(tiny_tile)
    det, onnx_path, ov_path = _export_and_compare(bundle, tmp_path, images, "lite0")

    # the preprocessing, the calibration and the versions travel with the model
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["image_size"]) == 64
    assert json.loads(props["mean"]) == [0.5, 0.5, 0.5] and json.loads(props["std"]) == [0.5, 0.5, 0.5]
    assert "bilinear" in props["resize"] and props["library_version"]
    assert float(props["threshold"]) == det.calibration.threshold
    assert json.loads(props["calibration"]) == det.calibration.to_dict()
    for model_path in (onnx_path, ov_path):
        loaded = load_exported(model_path.parent)
        assert loaded.image_size == 64 and loaded.threshold == det.calibration.threshold
        assert loaded.metadata["inference"] == det.inference.model_dump(mode="json")
        sidecar = json.loads((model_path.parent / META_FILE).read_text())
        assert sidecar["output_names"] == ["anomaly_map", "score", "normalized_score", "decision"]
    assert sorted(p.name for p in ov_path.parent.iterdir()) == ["export.json", "model.bin", "model.xml"]

    # arrays in, like Detector.predict: any size, the exported detector resizes
    from PIL import Image

    arr = np.asarray(Image.open(images[0]))
    assert OnnxDetector(onnx_path).predict([arr])[0]["score"] == pytest.approx(det.predict([arr])[0]["score"], rel=1e-5)

    # a top-k image score is exported as configured
    topk = tmp_path / "topk-bundle"
    shutil.copytree(bundle, topk)
    meta = json.loads((topk / "bundle.json").read_text())
    meta["inference"].update(score="topk_mean", topk_fraction=0.05)
    (topk / "bundle.json").write_text(json.dumps(meta))
    det_k = load_detector(topk, device="cpu")
    ref_k = det_k.predict(images, return_map=True)
    out_k = OnnxDetector(export_bundle(topk, tmp_path / "topk-onnx", "onnx"), threads=1).predict(images, return_map=True)
    check_parity("lite0 top-k onnxruntime", ref_k, out_k, det_k.calibration)


def test_resnet18_random_weights_export_faithfully(tiny_tile, tmp_path):
    """Structure only: a ResNet encoder (random weights) goes through both exporters."""
    bundle = _train(tiny_tile, tmp_path / "run", BackboneConfig(name="resnet18", weights="none"))
    _export_and_compare(bundle, tmp_path, _test_images(tiny_tile), "resnet18")


def test_cli_export_and_its_errors(tiny_tile, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from recontrast_core.cli.app import app

    bundle = _train(tiny_tile, tmp_path / "run", BackboneConfig(name="tf_efficientnet_lite0"))
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(bundle), "--format", "onnx", "--out", str(tmp_path / "cli"), "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model.onnx").is_file()

    def one_error_line(args, match):
        r = runner.invoke(app, ["export", *args])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and match in lines[0], r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)

    one_error_line([str(tmp_path), "--out", str(tmp_path / "x")], "not a model bundle")
    one_error_line([str(bundle), "--format", "tflite", "--out", str(tmp_path / "x")], "unknown export format")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_error_line([str(bundle), "--out", str(blocker)], "not a folder")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the extra were not installed
    one_error_line([str(bundle), "--format", "openvino", "--out", str(tmp_path / "y")], "recontrast[export]")


@pytest.mark.parametrize("kind,knn_size,image_score", [("patchknn", 64, "fused"), ("fused", 96, "fused"),
                                                      ("fused", 96, "patchknn")])
def test_every_model_kind_exports_faithfully(tiny_tile, tmp_path, kind, knn_size, image_score):
    """patch-kNN (the bank and its exact nearest-neighbour search inside the graph) and the
    fused kind (ReContrast at 64 px inside a 96 px graph: the resize matrices, both maps, the
    quantile normalisation; the image score from the fused map or from one branch's map)
    score the same in torch, onnxruntime and OpenVINO."""
    from recontrast_core.config import ModelConfig
    from recontrast_core.fit import fit_detector

    model = ModelConfig(kind=kind, patchknn={"image_size": knn_size, "fraction": 0.25},
                        fusion={"image_score": image_score})
    cfg = TrainConfig(backbone=BackboneConfig(name="tf_efficientnet_lite0"), **SMALL)
    bundle = fit_detector(read_mvtec(tiny_tile), model, cfg, tmp_path / "run", progress=False).bundle_dir
    det, onnx_path, _ = _export_and_compare(bundle, tmp_path, _test_images(tiny_tile), kind)
    assert det.kind == kind and det.image_size == knn_size
    if kind == "fused":
        assert det.scorer.fusion.image_score == image_score  # round-tripped through bundle.json
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert props["model_kind"] == kind and json.loads(props["image_size"]) == knn_size
