"""A normal-only folder through the whole local pipeline, as ``recontrast pipeline run
--local --params`` runs it: ingest (the dataset card is written and logged), train,
evaluate (no AUROC: the false-positive rate, the score distribution and the synthetic
AUROC, with the note), register (the gate compares synthetic_image_auroc, which both the
candidate and the baseline have). Embedded defaults: SQLite MLflow in the working folder,
KFP's local runner. Runs on ``tiles_root`` (magnetic-tile-dev, or its synthetic stand-in)."""

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


def test_normal_only_folder_through_the_local_pipeline(tiles_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "normal_only"
    data.mkdir()
    for f in sorted((tiles_root / "train" / "good").iterdir())[:16]:
        shutil.copy(f, data / f.name)  # a plain folder of normal photographs, nothing else
    params = {
        "data": {"source": str(data), "layout": "labelme"},  # no JSON at all: every image is normal
        "train": {"image_size": 64, "iterations": 2, "batch_size": 4, "decoder_blocks": [1, 1, 1],
                  "bottleneck_blocks": 1, "device": "cpu"},
        "baseline": {"fraction": 0.2},
        "registry": {"floors": {"image_auroc": 0.0}},
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
    assert "synthetic_image_auroc" in result["reason"], result["reason"]  # the gate used what both have

    runs = tmp_path / "runs" / "kfp-local"
    (card,) = runs.rglob("dataset_card.json")
    assert json.loads(card.read_text())  # ingest wrote the dataset card
    (metrics_path,) = [p for p in runs.rglob("metrics.json") if p.parent.name == "report"]
    payload = json.loads(metrics_path.read_text())
    m = payload["metrics"]
    assert "image_auroc" not in m and "AUROC" in payload["note"]
    assert 0.0 <= m["fpr_at_threshold"] <= 1.0 and "synthetic_image_auroc" in m
    assert "baseline_synthetic_image_auroc" in m

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("recontrast")
    (ingest_run,) = client.search_runs([exp.experiment_id], "tags.step = 'ingest'")
    files = {a.path for a in client.list_artifacts(ingest_run.info.run_id, "ingest")}
    assert "ingest/dataset_card.json" in files  # the card is the dataset's page in MLflow
