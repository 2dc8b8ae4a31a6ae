"""Training and evaluation from LabelMe and COCO annotations give the MVTec metrics, and a
normal-only dataset trains and evaluates (``tiles_root``: magnetic-tile-dev images, or their
synthetic stand-in where the real data is absent; tiny model, CPU).

Why the comparison is meaningful: the LabelMe and COCO versions are written from the same
small MVTec subset (8 training normals, 4 normal + 6 defective test images) with
byte-identical image files kept below ``images/train/`` and ``images/test/``, so the
readers' split rule (a ``train``/``test`` folder decides) gives exactly the MVTec train and
test membership; training rows sort in the same order (same file names), so the seeded
trainer, the calibration hold-out and the baseline's memory bank see the same images in
the same order. The only difference left is the masks: rasterised from traced polygons
(LabelMe: pixel-centre polygons; COCO: pixel-edge polygons, every second image a
compressed RLE) instead of read from PNGs. The tracers give back every mask exactly
(IoU 1.0, tests/unit/test_annotations.py), so every metric (image and pixel level, model
and baseline) must agree within ``TOLERANCE`` (1e-6, i.e. float noise; measured: equal).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recontrast_core.config import BaselineConfig, TrainConfig
from recontrast_core.data.layouts import read_coco, read_labelme, read_mvtec
from recontrast_core.data.validate import validate_manifest
from recontrast_core.evaluate import NORMAL_ONLY_NOTE, evaluate_bundle
from recontrast_core.train import train_model
from tests.annotation_writers import small_subset, write_coco, write_labelme

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOLERANCE = 1e-6
CFG = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                  seed=111, device="cpu", log_every=1, checkpoint_every=2)
BASELINE = BaselineConfig(fraction=0.2)


def test_labelme_and_coco_give_the_mvtec_metrics(tiles_root, tmp_path):
    sub = small_subset(tiles_root, tmp_path / "mvtec")
    versions = {
        "mvtec": read_mvtec(sub),
        "labelme": read_labelme(write_labelme(sub, tmp_path / "labelme")),
        "coco": read_coco(write_coco(sub, tmp_path / "coco", rle_every=2), annotations="annotations.json",
                          images="images"),
    }
    membership = {}
    metrics = {}
    for name, manifest in versions.items():
        validate_manifest(manifest)
        membership[name] = sorted((Path(e.path).name, e.split, e.label, e.defect_type) for e in manifest.entries)
        result = train_model(manifest, CFG, tmp_path / f"run_{name}", progress=False)
        payload = evaluate_bundle(result.bundle_dir, manifest, progress=False, device="cpu", baseline=BASELINE)
        metrics[name] = payload["metrics"]
    assert membership["labelme"] == membership["mvtec"] == membership["coco"]
    ref = metrics["mvtec"]
    assert {"image_auroc", "pixel_auroc", "aupro", "baseline_pixel_auroc"} <= set(ref)
    for name in ("labelme", "coco"):
        assert set(metrics[name]) == set(ref), name
        for key, value in ref.items():
            assert metrics[name][key] == pytest.approx(value, abs=TOLERANCE), (name, key, metrics[name][key], value)


def test_normal_only_dataset_trains_evaluates_and_checks(tiles_root, tmp_path):
    """No anomalous image anywhere: a LabelMe folder without annotations (the hash split
    holds out ~20% of the normal images): training and calibration as usual; evaluation
    reports the false-positive rate at the threshold, the score distribution and the
    synthetic AUROC with its note; ``recontrast data check`` passes and says so."""
    from recontrast_core import steps
    from recontrast_core.cli import app
    from recontrast_core.steps.settings import apply_overrides

    root = tmp_path / "normal_only"
    root.mkdir()
    for f in sorted((tiles_root / "train" / "good").iterdir())[:20]:
        shutil.copy(f, root / f.name)
    manifest = read_labelme(root)
    report = validate_manifest(manifest)
    assert report.counts["test"] == {"0": len(manifest.select(split="test")), "1": 0}
    assert 0 < report.counts["test"]["0"] < 20

    result = train_model(manifest, CFG, tmp_path / "run", progress=False)
    settings = apply_overrides(None, {"baseline.fraction": 0.2, "train.device": "cpu"})
    path = steps.evaluate(result.bundle_dir, manifest, tmp_path / "eval", settings, progress=False)
    payload = json.loads(path.read_text())
    m = payload["metrics"]
    assert payload["note"] == NORMAL_ONLY_NOTE and "AUROC" in payload["note"]
    assert "image_auroc" not in m and "precision_at_threshold" not in m
    assert 0.0 <= m["fpr_at_threshold"] <= 1.0 and m["threshold"] > 0
    assert m["score_min"] <= m["score_p50"] <= m["score_p95"] <= m["score_max"] and m["score_std"] >= 0
    assert 0.0 <= m["synthetic_image_auroc"] <= 1.0 and 0.0 <= m["baseline_synthetic_image_auroc"] <= 1.0
    assert payload["n_anomalous"] == 0 and len(payload["per_image"]) == report.counts["test"]["0"]
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["fpr_at_threshold"] == m["fpr_at_threshold"]

    res = CliRunner().invoke(app, ["data", "check", str(root), "--layout", "labelme", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    card = json.loads(res.stdout)
    assert card["ok"] and card["anomalous"] == 0 and card["notes"]
