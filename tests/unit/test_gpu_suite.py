"""The GPU suite runs end to end on CPU with --tiny, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
gpu_suite = pytest.importorskip("gpu_suite")


@pytest.mark.slow
def test_gpu_suite_tiny_runs_every_section(magnetic_tile_root, tmp_path):
    rc = gpu_suite.main(["--out", str(tmp_path / "out"), "--tiny", "--data", str(magnetic_tile_root)])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    sections = res["sections"]
    assert set(sections) == {"smoke", "speed", "accuracy", "parity", "levers"}
    failed = {f"{s}.{c}": r.get("error") for s, checks in sections.items() for c, r in checks.items() if not r["ok"]}
    assert not failed, failed
    assert set(sections["smoke"]) == {"train", "adapt_msc", "adapt_coft", "evaluate", "predict"}
    assert sections["speed"]["paper"]["train_images_per_s"] > 0 and sections["speed"]["lite0"]["eval_images_per_s"] > 0
    acc = sections["accuracy"]["lite0_paper_schedule"]
    assert 0 <= acc["image_auroc"] <= 1 and 0 <= acc["baseline_image_auroc"] <= 1
    par = sections["parity"]["fp32_vs_bf16"]
    assert par["recommended_inference_precision"] in ("bf16", "fp32") and par["n_images"] == 12
    md = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert "## parity" in md and "fp32_vs_bf16" in md


def test_gpu_suite_rejects_unknown_section(tmp_path, capsys):
    assert gpu_suite.main(["--out", str(tmp_path), "--tiny", "--sections", "smoke,nope"]) == 2
    assert "nope" in capsys.readouterr().err
