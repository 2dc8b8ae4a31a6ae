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

import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
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


# ---------------------------------------------------------------------- real v2 clients
def _recontrast_predict(bundle: Path, images: list[Path], env: dict, out: Path) -> dict[str, dict]:
    """``recontrast predict BUNDLE IMAGES --json``: the reference rows, by file name."""
    proc = subprocess.run([sys.executable, "-m", "recontrast_core.cli", "predict", str(bundle), *map(str, images),
                           "--out", str(out), "--no-overlays", "--no-progress", "--device", "cpu", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {Path(r["path"]).name: r for r in json.loads(proc.stdout)}


def _curl(url: str, body: bytes, tmp: Path, *headers: str) -> tuple[int, bytes]:
    """One POST with curl (the raw HTTP a platform engineer tries first); (status, body)."""
    (tmp / "body").write_bytes(body)
    cmd = ["curl", "-sS", "-o", str(tmp / "answer"), "-w", "%{http_code}", "--data-binary", f"@{tmp / 'body'}"]
    for h in headers:
        cmd += ["-H", h]
    proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout), (tmp / "answer").read_bytes()


def _tritonclient_checks(tc, port: int, name: str, version: str, files: list[bytes], check_scores, ref_maps) -> None:
    """tritonclient.http against the server: metadata, binary and JSON requests, outputs."""
    triton = tc.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300, connection_timeout=300)
    meta = triton.get_model_metadata(name)
    assert meta["versions"] == [version] and meta["platform"] == "pytorch", meta
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    assert triton.is_model_ready(name, model_version=version)

    # tritonclient: raw files, binary in and out (its defaults); then JSON (base64), no Content-Type
    for binary in (True, False):
        tensor = tc.InferInput("image", [len(files)], "BYTES")
        values = files if binary else [base64.b64encode(f) for f in files]
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
        result = triton.infer(name, [tensor], request_id=f"triton-{binary}")
        check_scores(result.as_numpy("score"), result.as_numpy("normalized_score"), result.as_numpy("decision"),
                     f"tritonclient binary_data={binary}")
        body = result.get_response()
        assert body["model_version"] == version and body["id"] == f"triton-{binary}"
        assert all(("data" in o) is False for o in body["outputs"])  # no outputs named: all binary

    # outputs honoured: the map asked for (binary), the score as JSON, in that order
    tensor = tc.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(files[:2], dtype=np.object_))
    result = triton.infer(name, [tensor], outputs=[tc.InferRequestedOutput("anomaly_map"),
                                                   tc.InferRequestedOutput("score", binary_data=False)])
    body = result.get_response()
    assert [o["name"] for o in body["outputs"]] == ["anomaly_map", "score"], body
    assert "binary_data_size" in body["outputs"][0]["parameters"] and len(body["outputs"][1]["data"]) == 2
    assert np.allclose(result.as_numpy("anomaly_map"), ref_maps, rtol=1e-5, atol=1e-6)
    with pytest.raises(tc.InferenceServerException, match="unknown output 'heatmap'"):
        triton.infer(name, [tensor], outputs=[tc.InferRequestedOutput("heatmap")])
    triton.close()


def test_kserve_answers_tritonclient_and_kserve_clients_json_and_binary(tiny_tile, mlflow_tracking, tmp_path):
    """The open inference protocol v2 with clients this project did not write: raw image
    files in a binary BYTES tensor (tritonclient's and kserve's default) score the same as
    ``recontrast predict``; ``outputs`` picks outputs and their encoding; every client error
    is a one-line v2 ``{"error"}`` body, no payload echoed, one log line, no traceback."""
    import tritonclient.http as tc  # the dev extra installs it: missing is a broken environment, not a skip
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    from recontrast_core.mlops.registry import get_client

    images = tile_test_images(tiny_tile)
    files = [p.read_bytes() for p in images]
    bundle = train_tiny(tiny_tile, tmp_path / "a", seed=111)
    env = {**server_env(mlflow_tracking.url), "RECONTRAST_MAX_REQUEST_MB": "2"}
    reference = _recontrast_predict(bundle, images, env, tmp_path / "predict")
    ref = [reference[p.name] for p in images]
    ref_maps = np.stack([r["anomaly_map"] for r in load_detector(bundle, device="cpu").predict(images[:2],
                                                                                                return_map=True)])
    name = f"v2-{uuid.uuid4().hex[:8]}"
    version = register_champion(bundle, name, get_client(mlflow_tracking.url))
    port = free_port()
    log = tmp_path / "kserve.log"  # the server's stdout and stderr
    server = ServerProcess([sys.executable, "-m", "recontrast_core.cli", "serve", "--model",
                            f"models:/{name}/{version}", "--port", str(port), "--device", "cpu"], env, log)
    url = f"http://127.0.0.1:{port}"

    def check_scores(score, normalized, decision, what: str) -> None:
        s_ref = np.array([r["score"] for r in ref])
        assert np.all(np.abs(np.asarray(score) - s_ref) <= SCORE_RTOL * np.abs(s_ref)), (what, score, s_ref)
        assert np.allclose(normalized, [r["normalized_score"] for r in ref], rtol=SCORE_RTOL, atol=1e-9), what
        assert np.asarray(decision).tolist() == [bool(r["decision"]) for r in ref], what

    try:
        server.wait_for(f"{url}/v2/models/{name}/ready")
        status, meta = http("GET", f"{url}/v2/models/{name}")
        assert status == 200 and meta["versions"] == [version] and meta["platform"] == "pytorch", meta
        if tc is not None:
            _tritonclient_checks(tc, port, name, version, files, check_scores, ref_maps)

        # kserve's InferenceRESTClient: binary (raw files) and JSON (base64); outputs named
        async def kserve_client(binary: bool, outputs=None, n: int = len(files)):
            client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=300))
            try:
                tensor = InferInput("image", [n], "BYTES")
                values = files[:n] if binary else [base64.b64encode(f) for f in files[:n]]
                tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
                request = InferRequest(name, [tensor], parameters={"binary_data_output": binary},
                                       request_outputs=outputs)
                return await client.infer(url, request, model_name=name)
            finally:
                await client.close()

        for binary in (True, False):
            response = asyncio.run(kserve_client(binary))
            out = {o.name: o.as_numpy() for o in response.outputs}
            check_scores(out["score"], out["normalized_score"], out["decision"], f"kserve client binary={binary}")
        response = asyncio.run(kserve_client(True, [RequestedOutput("anomaly_map", {"binary_data": True}),
                                                    RequestedOutput("decision", {"binary_data": False})], n=2))
        assert [o.name for o in response.outputs] == ["anomaly_map", "decision"]
        assert np.allclose(response.outputs[0].as_numpy(), ref_maps, rtol=1e-5, atol=1e-6)

        # client errors with raw HTTP: v2 bodies, small, one line, nothing echoed
        infer = f"{url}/v2/models/{name}/infer"
        junk = os.urandom(51_000)  # the 51 KB that came back as 147 KB
        head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 4 + len(junk)}}]}).encode()
        framed = head + struct.pack("<I", len(junk)) + junk
        b64 = base64.b64encode(files[0]).decode()
        cases = [
            (b'{"inputs": [{"name": "image",', (), 400, "request is not valid JSON (unexpected end of data"),
            (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}],
                         "outputs": [{"name": "mask"}]}).encode(), (), 400, "unknown output 'mask'"),
            (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "data": ["%%" + "A" * 4000]}]}).encode(), (), 400, "image[0]: not valid base64"),
            (framed, (f"Inference-Header-Content-Length: {len(head)}",), 400,
             "image[0]: not a readable PNG/JPEG/BMP/TIFF/WebP image"),
            (framed, (), 400, "a binary request needs the Inference-Header-Content-Length header"),
            (framed[:-10], (f"Inference-Header-Content-Length: {len(head)}",), 400, "runs past the end of the body"),
            (os.urandom(3 * 2**20), (), 413, "over the limit of 2097152 bytes (RECONTRAST_MAX_REQUEST_MB)"),
        ]
        for body, headers, status, expected in cases:
            got, answer = _curl(infer, body, tmp_path, *headers)
            error = json.loads(answer)["error"]
            assert got == status and expected in error and "\n" not in error, (got, answer[:500])
            assert len(answer) < 600 and "AAAAAAAAAA" not in error, answer[:500]
        got, answer = _curl(f"{url}/v2/models/{name}/versions/999/infer", b"{}", tmp_path)
        assert got == 404 and json.loads(answer) == {
            "error": f"model '{name}' version '999' is not served (version {version} is served)"}
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]
    rejected = [line for line in text.splitlines() if "rejected POST" in line]
    assert len(rejected) == (tc is not None) + len(cases) + 1, rejected  # tritonclient's unknown output, the cases, the version
    for _, _, status, expected in cases:
        assert sum(expected in line for line in rejected) == 1, (expected, rejected)
    assert max(len(line) for line in text.splitlines()) < 2000  # nothing like a payload in the log

