"""The served model is the trained model, to the last bit (issue 21 item 0).

A ReContrast bundle trained here is registered through the register step (a real `mlflow
server` with S3 on moto); the registry's copy (what `recontrast serve` and `mlflow models
serve` load) must hold byte-identical files, and every score field of the copy must equal
the trained bundle's exactly (same process, same threads: the earlier 4e-5 "served !=
trained" difference came from servers scoring with another thread count, not from the copy:
tests/integration/serving_support.py:server_env)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from recontrast_core.bundle import load_detector
from recontrast_core.config import ModelConfig, PipelineConfig, TrainConfig
from recontrast_core.data.layouts import read_mvtec
from recontrast_core.mlops import registry, tracking
from recontrast_core.steps import evaluate, register, train

pytestmark = pytest.mark.integration


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_registry_copy_is_bit_identical_and_scores_exactly_the_same(tiny_tile, mlflow_tracking, tmp_path,
                                                                       monkeypatch):
    name = f"copy-{uuid.uuid4().hex[:8]}"
    small = TrainConfig(image_size=64, iterations=4, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu", checkpoint_every=4)
    settings = PipelineConfig(train=small, model=ModelConfig(kind="recontrast"), baseline={"enabled": False},
                              registry={"model_name": name, "floors": {}, "baseline_floor": False})
    m = read_mvtec(tiny_tile)
    bundle = train(m, tmp_path / "train", settings, progress=False)
    metrics = evaluate(bundle, m, tmp_path / "eval", settings, progress=False)
    result = register(bundle, metrics, settings, manifest=m)
    client = tracking.get_client()
    copy = registry.download_bundle(client, name, client.get_model_version(name, result["version"]), tmp_path / "dl")
    assert _hashes(copy) == _hashes(bundle)  # model.safetensors and bundle.json, byte for byte

    paths = [str(p) for p in m.select(split="test").image_paths()]
    trained = load_detector(bundle, "cpu").predict(paths)
    served = load_detector(copy, "cpu").predict(paths)
    fields = ("score", "normalized_score", "decision")
    assert [{k: r[k] for k in fields} for r in served] == [{k: r[k] for k in fields} for r in trained]
    # and through the logged MLflow model, as `mlflow models serve` loads it
    import mlflow
    import pandas as pd

    monkeypatch.setenv("RECONTRAST_ALLOWED_PATH_ROOT", str(tiny_tile))  # the `path` input is off otherwise
    model = mlflow.pyfunc.load_model(f"models:/{name}/{result['version']}")
    out = model.predict(pd.DataFrame({"path": paths}))
    for field in fields:
        assert list(out[field]) == [r[field] for r in trained], field
