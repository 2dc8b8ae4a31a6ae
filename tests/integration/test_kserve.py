"""``recontrast serve`` (KServe ModelServer, open inference protocol v2) on loopback.

Two tiny bundles trained on real magnetic-tile images (different seeds; skipped where the
data is absent) are registered in the real MLflow server fixture (artifacts on moto S3).
``python -m recontrast_core.cli serve --model models:/<name>@champion --poll-s 2`` runs as
a subprocess; real HTTP requests check liveness, readiness, model metadata, v2 inference
(base64 images, JSON) against the bundle's own scores (same tolerance as
test_serving.py: relative 1e-6, measured 0), bad input (HTTP 400, one line naming the
element), then the reload: champion moved to version 2 is served within the poll interval
plus the load time, requests during the switch are answered by one version or the other
(scores match the version they report), and a champion moved to a broken version 3 keeps
version 2 serving (logged).
"""

from __future__ import annotations

import base64
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")
pytest.importorskip("kserve", reason="the serve extra is not installed (pip install 'recontrast[serve]')")

from recontrast_core.bundle import load_detector  # noqa: E402

from .conftest import free_port  # noqa: E402
from .serving_support import (  # noqa: E402
    ServerProcess,
    http,
    register_champion,
    server_env,
    tile_test_images,
    train_tiny,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
SCORE_RTOL = 1e-6
POLL_S = 2.0
LOAD_ALLOWANCE_S = 90.0  # download + load on a busy 2-core CI machine


def _infer_body(b64: list[str], **params) -> dict:
    body: dict = {"id": "t", "inputs": [{"name": "image", "shape": [len(b64)], "datatype": "BYTES", "data": b64}]}
    if params:
        body["parameters"] = params
    return body


def _outputs(body: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in body["outputs"]}


def _matches(body: dict, reference: list[dict]) -> bool:
    out = _outputs(body)
    s_ref = np.array([r["score"] for r in reference])
    return (bool(np.all(np.abs(out["score"] - s_ref) <= SCORE_RTOL * np.abs(s_ref)))
            and np.allclose(out["normalized_score"], [r["normalized_score"] for r in reference],
                            rtol=SCORE_RTOL, atol=1e-9)
            and out["decision"].tolist() == [r["decision"] for r in reference])


def test_kserve_predictor_serves_and_follows_the_champion(tiny_tile, mlflow_tracking, tmp_path):
    from recontrast_core.mlops.registry import get_client

    client = get_client(mlflow_tracking.url)
    images = tile_test_images(tiny_tile)
    bundle_a = train_tiny(tiny_tile, tmp_path / "a", seed=111)
    bundle_b = train_tiny(tiny_tile, tmp_path / "b", seed=7)
    ref_a = load_detector(bundle_a, device="cpu").predict(images, return_map=True)
    ref_b = load_detector(bundle_b, device="cpu").predict(images)
    assert not np.allclose([r["score"] for r in ref_a], [r["score"] for r in ref_b], rtol=1e-3)

    name = f"kserve-{uuid.uuid4().hex[:8]}"
    v1 = register_champion(bundle_a, name, client)
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "recontrast_core.cli", "serve", "--model", f"models:/{name}@champion",
         "--port", str(port), "--poll-s", str(POLL_S), "--device", "cpu"],
        server_env(mlflow_tracking.url), tmp_path / "kserve.log")
    url = f"http://127.0.0.1:{port}"
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
    try:
        live = server.wait_for(f"{url}/v2/health/live")
        ready = server.wait_for(f"{url}/v2/models/{name}/ready")
        print(f"\nlive after {live:.1f}s, ready {ready:.1f}s later", file=sys.stderr)
        assert http("GET", f"{url}/v2/models/nope/ready")[0] == 404

        status, meta = http("GET", f"{url}/v2/models/{name}")
        assert status == 200 and meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}], meta
        assert {o["name"]: o["shape"] for o in meta["outputs"]}["anomaly_map"] == [-1, 64, 64]

        # scores, decisions and maps as the bundle's own Detector
        status, body = http("POST", f"{url}/v2/models/{name}/infer", _infer_body(b64))
        assert status == 200, body
        assert body["model_version"] == v1 and body["parameters"]["model_version"] == v1, body
        assert body["parameters"]["model_uri"] == f"models:/{name}/{v1}" and body["id"] == "t"
        assert [o["name"] for o in body["outputs"]] == ["score", "normalized_score", "decision"]
        assert _matches(body, ref_a), (body, ref_a)
        s_ref = np.array([r["score"] for r in ref_a])
        rel = float(np.max(np.abs(_outputs(body)["score"] - s_ref) / np.abs(s_ref)))
        print(f"max relative score difference: {rel:.2e}", file=sys.stderr)
        status, body = http("POST", f"{url}/v2/models/{name}/infer", _infer_body(b64[:3], return_map=True))
        assert status == 200, body
        maps = _outputs(body)["anomaly_map"]
        assert maps.shape == (3, 64, 64) and _matches(body, ref_a[:3])
        assert np.allclose(maps, np.stack([r["anomaly_map"] for r in ref_a[:3]]), rtol=1e-5, atol=1e-6)

        # bad input: 400, one line naming what is wrong
        bad_image = base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode()
        for payload, expected in (
            (_infer_body([b64[0], "%%%"]), "image[1]: not valid base64"),
            (_infer_body([b64[0], bad_image]), "image[1]: not a readable PNG/JPEG/BMP/TIFF/WebP image"),
            ({"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES", "data": [b64[0]]}]},
             "expected a BYTES input named 'image'"),
            (_infer_body([b64[0]], return_map="maybe"), "return_map must be true or false"),
            ({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": [b64[0]]}]}, "input 'image'"),
        ):
            status, body = http("POST", f"{url}/v2/models/{name}/infer", payload)
            assert status == 400 and expected in body["error"] and "\n" not in body["error"], (status, body)

        # the champion moves: the new version is served within the poll interval (+ its load)
        v2 = register_champion(bundle_b, name, client)
        seen, start = [], time.monotonic()
        while time.monotonic() - start < POLL_S + LOAD_ALLOWANCE_S:
            status, body = http("POST", f"{url}/v2/models/{name}/infer", _infer_body(b64))
            assert status == 200, body  # no request fails during the switch
            seen.append(body["model_version"])
            assert _matches(body, ref_a if body["model_version"] == v1 else ref_b), body
            if body["model_version"] == v2:
                break
            time.sleep(0.2)
        switched = time.monotonic() - start
        assert seen[-1] == v2 and set(seen) <= {v1, v2}, seen
        print(f"version {v2} served {switched:.1f}s after the alias moved (poll {POLL_S}s)", file=sys.stderr)

        # a broken champion: the load fails, version 2 keeps serving, readiness stays
        broken = tmp_path / "broken"
        shutil.copytree(bundle_b, broken)
        (broken / "model.safetensors").write_bytes(b"not safetensors")
        v3 = register_champion(broken, name, client)
        deadline = time.monotonic() + POLL_S + LOAD_ALLOWANCE_S
        while "failed, still serving version" not in server.log_tail(20000) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert f"models:/{name}@champion failed, still serving version {v2}" in server.log_tail(20000)
        status, body = http("POST", f"{url}/v2/models/{name}/infer", _infer_body(b64))
        assert status == 200 and body["model_version"] == v2 and _matches(body, ref_b)
        assert http("GET", f"{url}/v2/models/{name}/ready")[0] == 200
        assert v3 not in seen
    finally:
        server.stop()
