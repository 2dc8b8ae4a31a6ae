"""The adapt branch of the pipeline, locally, as ``recontrast pipeline run --local --params``.

ingest -> adapt (MSC) -> train -> evaluate -> register on a small subset of ``tiles_root``
(magnetic-tile-dev, or its synthetic stand-in: 8 normal training images, 2 good + 2 cracked
test images), embedded defaults (SQLite MLflow in the working folder, KFP's local runner). Every adapt setting
travels in the pipeline's one ``settings`` parameter; the adapted encoder's metadata must
show every one of them, and the trained bundle must have started from that encoder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.integration.test_ingest import copy_subset

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ADAPT = {"epochs": 1, "batch_size": 8, "lr": 0.003, "angular_weight": 32.0, "crop_scale": [0.6, 1.0],
         "hflip": False, "seed": 3}


def test_local_pipeline_adapts_with_every_setting(tiles_root: Path, tmp_path: Path) -> None:
    data = copy_subset(tiles_root, tmp_path / "tiles")
    params = {
        "data": {"source": str(data)},
        "adapt_method": "msc",
        "adapt": ADAPT,
        "train": {"image_size": 64, "iterations": 2, "batch_size": 4, "decoder_blocks": [1, 1, 1],
                  "bottleneck_blocks": 1, "device": "cpu", "seed": 7},
        "registry": {"floors": {"image_auroc": 0.0}, "baseline_floor": False},  # 2 iterations: mechanics only
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "recontrast_core.cli", "pipeline", "run", "--local", "--params", "params.yaml", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["promoted"] is True

    (meta_path,) = (tmp_path / "runs" / "kfp-local").rglob("encoder.json")
    meta = json.loads(meta_path.read_text())
    settings = meta["settings"]
    assert meta["method"] == "msc" and meta["n_images"] == 8
    assert {k: settings[k] for k in ADAPT} == ADAPT  # seed 3 is the adapt seed, not train's 7
    assert settings["image_size"] == 64  # the encoder the trainer uses

    (bundle_json,) = [p for p in (tmp_path / "runs" / "kfp-local").rglob("bundle.json")
                      if "candidates" not in p.parts]  # auto keeps the ReContrast candidate beside it
    init = json.loads(bundle_json.read_text())["training"]["init_encoder"]
    assert Path(init) == meta_path.with_name("encoder.safetensors")  # training started from it
