"""``mlflow models serve`` (MLflow's FastAPI scoring server) on the registered pyfunc model.

A tiny bundle trained on real magnetic-tile images (skipped where the data is absent) is
logged with ``log_pyfunc`` (as code: ``model_code.py`` + the bundle + the project's wheel)
to the real MLflow server fixture (artifacts on moto S3), registered and made champion;
``mlflow models serve -m models:/<name>@champion --env-manager local`` runs as a subprocess
on a free loopback port with ``RECONTRAST_ALLOWED_PATH_ROOT`` set to the images' folder.
Real HTTP requests to ``/invocations``: base64 images (``dataframe_records``), paths under
the allowed root (``dataframe_split``), with and without ``params.return_map``, bad input,
and paths outside the root (one answer whether or not the file exists).
(``--env-manager virtualenv``, which installs the logged wheel into a new environment:
tests/integration/test_mlflow_virtualenv.py.)

Tolerance: the server runs the same code on the same CPU with the same batch, so scores
are expected to be bit-identical; the test allows a relative 1e-6 (JSON carries float64
exactly) and prints the measured difference. Decisions must be identical.
"""

from __future__ import annotations

import base64
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")

from recontrast_core.bundle import load_detector  # noqa: E402
from recontrast_core.mlops.serving.pyfunc_model import PATH_REFUSED, PATH_ROOT_ENV  # noqa: E402

from .conftest import free_port  # noqa: E402
from .serving_support import (  # noqa: E402
    ServerProcess,
    http,
    register_champion,
    server_env,
    tile_test_images,
    train_tiny,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
SCORE_RTOL = 1e-6


def _check(predictions: list[dict], reference: list[dict], with_map: bool) -> float:
    """Scores, normalized scores and decisions against the bundle's; returns the max rel diff."""
    assert len(predictions) == len(reference)
    s = np.array([p["score"] for p in predictions])
    s_ref = np.array([r["score"] for r in reference])
    n = np.array([p["normalized_score"] for p in predictions])
    n_ref = np.array([r["normalized_score"] for r in reference])
    rel = float(np.max(np.abs(s - s_ref) / np.abs(s_ref)))
    assert rel <= SCORE_RTOL, (s, s_ref)
    assert np.allclose(n, n_ref, rtol=SCORE_RTOL, atol=1e-9), (n, n_ref)
    assert [p["decision"] for p in predictions] == [r["decision"] for r in reference]
    if with_map:
        for p, r in zip(predictions, reference):
            m = np.asarray(p["anomaly_map"], dtype=np.float32)
            assert m.shape == (64, 64) == r["anomaly_map"].shape
            assert np.allclose(m, r["anomaly_map"], rtol=1e-5, atol=1e-6)
    else:
        assert all("anomaly_map" not in p for p in predictions)
    return rel


def test_mlflow_models_serve_scores_like_the_bundle(tiny_tile, mlflow_tracking, tmp_path):
    from recontrast_core.mlops.registry import get_client

    bundle = train_tiny(tiny_tile, tmp_path / "run")
    images = tile_test_images(tiny_tile)
    reference = load_detector(bundle, device="cpu").predict(images, return_map=True)

    name = f"serve-{uuid.uuid4().hex[:8]}"
    register_champion(bundle, name, get_client(mlflow_tracking.url))

    # the served model is code, its bundle safetensors: no pickle in what was logged
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl")))
    assert (local / "model_code.py").is_file() and not list(local.rglob("*.pkl"))
    assert (local / "artifacts" / "recontrast-0.1.0-py3-none-any.whl").is_file()

    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**server_env(mlflow_tracking.url), PATH_ROOT_ENV: str(tiny_tile)}
    server = ServerProcess(
        [str(mlflow_bin), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        took = server.wait_for(f"{url}/ping")
        print(f"\nmlflow models serve ready after {took:.1f}s", file=sys.stderr)

        # base64 of the files' bytes, records orientation
        b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
        status, body = http("POST", f"{url}/invocations", {"dataframe_records": [{"image_b64": b} for b in b64]})
        assert status == 200, body
        rel_b64 = _check(body["predictions"], reference, with_map=False)

        # paths under the allowed root (the server's RECONTRAST_ALLOWED_PATH_ROOT), split
        # orientation, with the maps
        split = {"columns": ["path"], "data": [[str(p)] for p in images]}
        status, body = http("POST", f"{url}/invocations", {"dataframe_split": split, "params": {"return_map": True}})
        assert status == 200, body
        rel_path = _check(body["predictions"], reference, with_map=True)

        # base64 with the maps; without them for paths
        status, body = http("POST", f"{url}/invocations",
                            {"dataframe_records": [{"image_b64": b64[0]}], "params": {"return_map": True}})
        assert status == 200, body
        _check(body["predictions"], reference[:1], with_map=True)
        status, body = http("POST", f"{url}/invocations", {"dataframe_split": split})
        assert status == 200, body
        _check(body["predictions"], reference, with_map=False)
        print(f"max relative score difference: b64 {rel_b64:.2e}, path {rel_path:.2e}", file=sys.stderr)

        # bad input: HTTP 400 naming the row
        for payload, expected in (
            ({"dataframe_records": [{"image_b64": b64[0]}, {"image_b64": "%%%"}]}, "row 1 (image_b64): not valid base64"),
            ({"dataframe_records": [{"image_b64": base64.b64encode(b"not an image").decode()}]},
             "row 0 (image_b64): not a readable PNG/JPEG/BMP/TIFF/WebP image"),
            ({"dataframe_split": {"columns": ["path"], "data": [[str(images[0])], [str(tiny_tile / "nope.png")]]}},
             "row 1: "),  # under the root: the missing file is named
        ):
            status, body = http("POST", f"{url}/invocations", payload)
            assert status == 400, body
            assert body["error_code"] == "INVALID_PARAMETER_VALUE" and expected in body["message"], body

        # outside the root: one answer for an existing file, a missing one, a way out by ".."
        (tiny_tile / "escape.png").symlink_to(tmp_path / "serve.log")  # a symlink leaving the root
        answers = set()
        for outside in (str(tmp_path / "serve.log"), str(tmp_path / "absent.png"), "/etc/passwd",
                        "../serve.log", "escape.png"):
            status, body = http("POST", f"{url}/invocations",
                                {"dataframe_split": {"columns": ["path"], "data": [[outside]]}})
            assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
            answers.add(body["message"].rsplit("Error: ", 1)[-1])
        assert answers == {f"row 0 (path): {PATH_REFUSED}"}, answers
    finally:
        server.stop()
    assert server.proc.returncode is not None
