"""Few-shot through the whole local pipeline with the baseline floor on (``recontrast
pipeline run --local --params``, embedded SQLite MLflow, KFP's local runner): ``shots: 8``
trains on 8 normal images, and the training-free baseline beside the evaluation is fitted on
the same 8 shots (before, it used every normal image, so an 8-shot model could never pass
the floor). The gate's decision states the paired bootstrap interval; the candidate is
promoted when it is not significantly below that baseline. Runs on ``tiles_root``
(magnetic-tile-dev, or its synthetic stand-in)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_eight_shots_are_compared_with_an_eight_shot_baseline(tiles_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "tiles"
    for sub, n in (("train/good", 24), ("test/good", 8), ("test/blowhole", 8)):
        (data / sub).mkdir(parents=True)
        for f in sorted((tiles_root / sub).iterdir())[:n]:
            shutil.copy(f, data / sub / f.name)
    params = {
        "data": {"source": str(data)},
        "shots": 8,
        # auto over a small grid, the patch-kNN candidate only (deterministic): its bank and the
        # baseline's hold the same 8 shots, so the two score alike and the floor must pass
        "model": {"kind": "auto", "patchknn": {"image_size": 64},
                  "auto": {"backbones": ["tf_efficientnet_lite0"], "image_sizes": [64], "input_stats": ["auto"],
                           "kinds": ["patchknn"]}},
        "train": {"image_size": 64, "iterations": 2, "batch_size": 4, "decoder_blocks": [1, 1, 1],
                  "bottleneck_blocks": 1, "device": "cpu"},
        "registry": {"floors": {"image_auroc": 0.0}},  # baseline_floor: on (the default)
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "recontrast_core.cli", "pipeline", "run", "--local", "--params", "params.yaml",
         "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])

    runs = tmp_path / "runs" / "kfp-local"
    (metrics_path,) = [p for p in runs.rglob("metrics.json") if p.parent.name == "report"]
    payload = json.loads(metrics_path.read_text())
    m = payload["metrics"]
    assert payload["baseline"]["n_train_images"] == 8  # the same shots as the model
    assert "baseline_image_auroc" in m and m["baseline_delta_image_auroc_lo"] <= m["baseline_delta_image_auroc_hi"]
    assert m["baseline_delta_image_auroc_hi"] >= 0  # not significantly below its 8-shot baseline
    assert result["promoted"] is True, result
    assert "bootstrap" in result["reason"], result["reason"]
    (bundle_json,) = [p for p in runs.rglob("bundle.json")
                      if p.parent.name == "bundle" and "candidates" not in p.parts]
    meta = json.loads(bundle_json.read_text())
    assert meta["training"]["n_train_images"] == 8 and meta["model_kind"] == "patchknn"
