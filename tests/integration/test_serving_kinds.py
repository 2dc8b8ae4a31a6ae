"""Every model kind behind both model servers: a patch-kNN and a fused bundle (tiny, real
magnetic-tile images; skipped where the data is absent) registered in the real MLflow server
fixture (artifacts on moto S3), each served by ``mlflow models serve`` and by ``recontrast
serve`` (KServe, v2), real HTTP requests, results equal to the bundle's own ``Detector``
(same code on the same CPU: expected bit-identical; allowed relative 1e-6, or 1e-7 absolute
for scores near 0, as fused scores may be)."""

from __future__ import annotations

import base64
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")
pytest.importorskip("kserve", reason="the serve extra is not installed (pip install 'recontrast[serve]')")

from recontrast_core.bundle import load_detector  # noqa: E402
from recontrast_core.config import BackboneConfig, ModelConfig, TrainConfig  # noqa: E402
from recontrast_core.data.layouts import read_mvtec  # noqa: E402
from recontrast_core.fit import fit_detector  # noqa: E402

from .conftest import free_port  # noqa: E402
from .serving_support import SMALL, ServerProcess, http, register_champion, server_env, tile_test_images  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _same(scores, normalized, decisions, reference: list[dict]) -> None:
    s_ref = np.array([r["score"] for r in reference])
    assert np.allclose(np.asarray(scores, dtype=np.float64), s_ref, rtol=1e-6, atol=1e-7), (scores, s_ref)
    assert np.allclose(normalized, [r["normalized_score"] for r in reference], rtol=1e-6, atol=1e-9)
    assert list(decisions) == [r["decision"] for r in reference]


@pytest.mark.parametrize("kind,knn_size", [("patchknn", 64), ("fused", 96)])
def test_both_servers_serve_every_kind(tiny_tile, mlflow_tracking, tmp_path, kind, knn_size):
    from recontrast_core.mlops.registry import get_client

    model = ModelConfig(kind=kind, patchknn={"image_size": knn_size, "fraction": 0.25})
    cfg = TrainConfig(backbone=BackboneConfig(name="tf_efficientnet_lite0"), **SMALL)
    bundle = fit_detector(read_mvtec(tiny_tile), model, cfg, tmp_path / "run", progress=False).bundle_dir
    images = tile_test_images(tiny_tile)
    reference = load_detector(bundle, device="cpu").predict(images, return_map=True)
    name = f"kind-{kind}-{uuid.uuid4().hex[:6]}"
    register_champion(bundle, name, get_client(mlflow_tracking.url))
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
    env = server_env(mlflow_tracking.url)

    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = ServerProcess([str(mlflow_bin), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
                            "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env, tmp_path / "mlflow.log")
    try:
        server.wait_for(f"http://127.0.0.1:{port}/ping")
        status, body = http("POST", f"http://127.0.0.1:{port}/invocations",
                            {"dataframe_records": [{"image_b64": b} for b in b64], "params": {"return_map": True}})
        assert status == 200, body
        p = body["predictions"]
        _same([r["score"] for r in p], [r["normalized_score"] for r in p], [r["decision"] for r in p], reference)
        assert np.allclose(np.asarray(p[0]["anomaly_map"], dtype=np.float32), reference[0]["anomaly_map"],
                           rtol=1e-5, atol=1e-6)
    finally:
        server.stop()

    port = free_port()
    server = ServerProcess([sys.executable, "-m", "recontrast_core.cli", "serve", "--model", f"models:/{name}@champion",
                            "--port", str(port), "--device", "cpu"], env, tmp_path / "kserve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_for(f"{url}/v2/health/live")
        server.wait_for(f"{url}/v2/models/{name}/ready")
        status, meta = http("GET", f"{url}/v2/models/{name}")
        assert status == 200 and {o["name"]: o["shape"] for o in meta["outputs"]}["anomaly_map"] == [-1, knn_size,
                                                                                                      knn_size]
        body = {"id": "k", "inputs": [{"name": "image", "shape": [len(b64)], "datatype": "BYTES", "data": b64}]}
        status, out = http("POST", f"{url}/v2/models/{name}/infer", body)
        assert status == 200, out
        o = {x["name"]: np.asarray(x["data"]).reshape(x["shape"]) for x in out["outputs"]}
        _same(o["score"], o["normalized_score"], o["decision"].tolist(), reference)
    finally:
        server.stop()
