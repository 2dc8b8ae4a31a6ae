"""INT8 exports (``onnx-int8`` / ``openvino-int8``, recontrast_core/export.py) on a tiny
trained bundle: they load in plain onnxruntime / OpenVINO with the fp32 export's inputs and
outputs, score close to the bundle (torch), and bad calibration input is one line, exit 2,
with nothing written.

The bundle: 64 px, 2 iterations, one block per decoder stage, trained on 12 normal images of
``tiles_root`` (magnetic-tile-dev, or its synthetic stand-in), calibrated on the same 12.
Tolerances against torch on the subset's 10 test images (docs/export.md has the figures at
256 px): scores within 2% relative, maps within 10% of their range, Spearman rank correlation
of the scores >= 0.9 (measured, real and synthetic tiles: scores 4e-4..1.6e-3, maps
1.6e-2..3.2e-2, Spearman 0.988..1.0). About 30 s.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install 'recontrast[export]')")
pytest.importorskip("openvino", reason="the export extra is not installed (pip install 'recontrast[export]')")

from recontrast_core.bundle import load_detector  # noqa: E402
from recontrast_core.config import TrainConfig  # noqa: E402
from recontrast_core.data.layouts import read_mvtec  # noqa: E402
from recontrast_core.errors import UserError  # noqa: E402
from recontrast_core.export import (  # noqa: E402
    META_FILE,
    OUTPUT_NAMES,
    OnnxDetector,
    OpenVinoDetector,
    export_bundle,
    quantized_node,
)
from recontrast_core.train import train_model  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SCORE_RTOL = 0.02
MAP_TOL = 0.1  # of the maps' range
MIN_SPEARMAN = 0.9


@pytest.fixture(scope="module")
def tiny(tiles_root: Path, tmp_path_factory) -> dict:
    """A 12 + 10 image subset of ``tiles_root``, a bundle trained on it and its INT8 exports."""
    root = tmp_path_factory.mktemp("int8") / "tiles"
    for rel in sorted((tiles_root / "train" / "good").iterdir())[:12]:
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(rel, root / "train" / "good" / rel.name)
    tests = []
    for sub, n in (("good", 4), ("blowhole", 3), ("crack", 3)):
        for f in sorted((tiles_root / "test" / sub).iterdir())[:n]:
            (root / "test" / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "test" / sub / f.name)
            tests.append(root / "test" / sub / f.name)
            if sub != "good":
                mask = tiles_root / "ground_truth" / sub / f"{f.stem}_mask.png"
                (root / "ground_truth" / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, root / "ground_truth" / sub / mask.name)
    cfg = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                      device="cpu", log_every=1, checkpoint_every=2)
    bundle = train_model(read_mvtec(root), cfg, root.parent / "run", progress=False).bundle_dir
    onnx_path = export_bundle(bundle, root.parent / "onnx-int8", "onnx-int8", calibration_data=root)
    ov_path = export_bundle(bundle, root.parent / "openvino-int8", "openvino-int8", calibration_data=root)
    return {"root": root, "bundle": bundle, "tests": tests, "onnx": onnx_path, "openvino": ov_path}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_int8_models_load_in_plain_runtimes_with_the_fp32_contract(tiny):
    import onnx
    import onnxruntime as ort
    import openvino as ov

    # onnxruntime, nothing of ours: the fp32 export's input and outputs
    sess = ort.InferenceSession(str(tiny["onnx"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("image", "tensor(uint8)")]
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    amap, score, norm, decision = sess.run(None, {"image": x})
    assert amap.shape == (2, 64, 64) and score.shape == norm.shape == decision.shape == (2,)
    assert decision.dtype == bool and amap.dtype == score.dtype == np.float32

    # quantized where it should be: Q/DQ pairs in the decoder, none in the encoders or the head
    graph = onnx.load(str(tiny["onnx"])).graph
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 10
    convs = {n.name: n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")}
    producers = {o: n for n in graph.node for o in n.output}

    def int8_weight(conv) -> bool:
        w = producers.get(conv.input[1])
        return w is not None and w.op_type == "DequantizeLinear"

    decoder = [c for name, c in convs.items() if "/decoder/" in name]
    encoder = [c for name, c in convs.items() if "/encoder/" in name or "/frozen/" in name]
    assert decoder and encoder
    assert all(int8_weight(c) for c in decoder)
    assert not any(int8_weight(c) for c in encoder)
    assert not any(int8_weight(c) for name, c in convs.items() if name.startswith("/blur/"))
    assert all(quantized_node(c.name) == int8_weight(c) for c in convs.values())

    # OpenVINO, plain: FakeQuantize (INT8) ops, same input and outputs
    core = ov.Core()
    model = core.read_model(str(tiny["openvino"]))
    assert sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) > 10
    compiled = core.compile_model(model, "CPU")
    assert [o.get_any_name() for o in compiled.outputs] == list(OUTPUT_NAMES)
    res = compiled.create_infer_request().infer({"image": x})
    assert np.array(res[compiled.output("anomaly_map")]).shape == (2, 64, 64)

    # metadata: the fp32 export's, with the precision and the calibration
    for path in (tiny["onnx"], tiny["openvino"]):
        meta = json.loads((path.parent / META_FILE).read_text())
        assert meta["backend"] in ("onnx-int8", "openvino-int8") and "int8" in meta["precision"]
        assert meta["quantization"]["calibration_images"] == 12
        assert meta["quantization"]["calibration_layout"] == "mvtec"
        assert meta["output_names"] == list(OUTPUT_NAMES) and meta["image_size"] == 64
        assert sorted(p.name for p in path.parent.iterdir()) == sorted([META_FILE, *meta["files"]])


def test_int8_scores_close_to_torch(tiny):
    det = load_detector(tiny["bundle"], device="cpu")
    ref = det.predict(tiny["tests"], return_map=True)
    s_ref = np.array([r["score"] for r in ref])
    maps_ref = np.stack([r["anomaly_map"] for r in ref])
    span = maps_ref.max() - maps_ref.min()
    for name, exported in (("onnxruntime", OnnxDetector(tiny["onnx"], threads=1, batch_size=3)),
                           ("openvino", OpenVinoDetector(tiny["openvino"], threads=1, batch_size=3))):
        out = exported.predict(tiny["tests"], return_map=True)
        s = np.array([r["score"] for r in out])
        maps = np.stack([r["anomaly_map"] for r in out])
        rel = float(np.max(np.abs(s - s_ref) / np.abs(s_ref)))
        map_rel = float(np.abs(maps - maps_ref).max() / span)
        rho = _spearman(s, s_ref)
        print(f"\n{name} int8 vs torch: score max rel {rel:.2e}, map max abs / range {map_rel:.2e}, spearman {rho:.4f}")
        assert rel <= SCORE_RTOL and map_rel <= MAP_TOL and rho >= MIN_SPEARMAN, (name, rel, map_rel, rho)
        # the calibration in the graph is the fp32 export's: decision = score >= threshold
        assert [r["decision"] for r in out] == [bool(v >= det.calibration.threshold) for v in s.astype(np.float32)]


def _cli(args):
    from typer.testing import CliRunner

    from recontrast_core.cli.app import app

    return CliRunner().invoke(app, ["export", *args])


def _one_error_line(args, match: str) -> None:
    r = _cli(args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and match in lines[0], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_bad_calibration_data_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path):
    bundle = str(tiny["bundle"])
    fresh = tmp_path / "fresh"
    _one_error_line([bundle, "--format", "onnx-int8", "--out", str(fresh)], "needs --calibration-data")
    _one_error_line([bundle, "--format", "openvino-int8", "--calibration-data", str(tmp_path / "nope"),
                     "--out", str(fresh)], "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    _one_error_line([bundle, "--format", "onnx-int8", "--calibration-data", str(empty), "--out", str(fresh)],
                    "no images")
    a_file = tmp_path / "a-file.png"
    a_file.write_bytes(b"not a png")
    _one_error_line([bundle, "--format", "onnx-int8", "--calibration-data", str(a_file), "--out", str(fresh)],
                    "not a folder")
    only_test = tmp_path / "only-test"
    shutil.copytree(tiny["root"] / "test", only_test / "test")
    (only_test / "train" / "good").mkdir(parents=True)
    _one_error_line([bundle, "--format", "onnx-int8", "--calibration-data", str(only_test), "--out", str(fresh)],
                    "calibration data")
    _one_error_line([bundle, "--format", "onnx", "--calibration-data", str(tiny["root"]), "--out", str(fresh)],
                    "--calibration-data is for the INT8 formats")
    _one_error_line([bundle, "--format", "onnx-int8", "--calibration-data", str(tiny["root"]),
                     "--calibration-images", "0", "--out", str(fresh)], "at least 1")
    assert not fresh.exists()

    # an unreadable image among the calibration images: one line, a previous export untouched
    out = tmp_path / "out"
    assert _cli([bundle, "--format", "onnx", "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny["root"] / "train" / "good", corrupt)
    (corrupt / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _one_error_line([bundle, "--format", "onnx-int8", "--calibration-data", str(corrupt), "--out", str(out)],
                    "calibration data")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # a patch-kNN bundle has no decoder to quantize: said before any work
    knn = tmp_path / "knn-bundle"
    shutil.copytree(tiny["bundle"], knn)
    meta = json.loads((knn / "bundle.json").read_text())
    meta["model_kind"] = "patchknn"
    (knn / "bundle.json").write_text(json.dumps(meta))
    _one_error_line([str(knn), "--format", "onnx-int8", "--calibration-data", str(tiny["root"]),
                     "--out", str(fresh)], "no decoder to quantize")
    assert not fresh.exists()


def test_a_failure_during_quantization_leaves_no_marker_and_no_model(tiny, tmp_path, monkeypatch):
    """export.json is removed first and written last; the model is renamed into place: a disk
    filling up while quantizing leaves neither, nor temporary files."""
    import recontrast_core.export as export

    out = tmp_path / "out"
    assert _cli([str(tiny["bundle"]), "--format", "onnx", "--out", str(out)]).exit_code == 0
    assert (out / META_FILE).is_file()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "quantize_onnx", full_disk)
    for fmt in ("onnx-int8", "openvino-int8"):
        with pytest.raises(UserError, match="no space left"):
            export_bundle(tiny["bundle"], out, fmt, calibration_data=tiny["root"])
        names = sorted(p.name for p in out.iterdir())
        assert META_FILE not in names and not any(n.startswith(".") for n in names), names
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # the old fp32 file, never half-replaced
