"""``mlflow models serve --env-manager virtualenv`` on the registered model: MLflow builds a
new environment from what the model carries (python_env.yaml, requirements.txt naming the
project's wheel inside the model folder, constraints.txt with the logging environment's
versions), installs it with pip, starts its scoring server in it and answers
``/invocations``, with nothing of this checkout on the server's ``sys.path``.

Opt-in (it installs torch and its CUDA libraries, several GB, into a new environment: about
4 minutes here on 2 cores from the machine's local wheel caches and the package index):
``RECONTRAST_TEST_VIRTUALENV=1 pytest tests/integration/test_mlflow_virtualenv.py``. It also
needs ``pyenv`` with this interpreter's Python version installed (MLflow's virtualenv manager
creates the environment with ``pyenv``'s Python of the version the model was logged with).
The environment goes into a temporary ``MLFLOW_ENV_ROOT`` removed afterwards, unless
``RECONTRAST_TEST_MLFLOW_ENV_ROOT`` names a folder to keep it in (a rerun then reuses it).
"""

from __future__ import annotations

import base64
import os
import platform
import shutil
import subprocess
import sys
import time
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

SCORE_RTOL = 1e-6


def _pyenv_has_this_python() -> str:
    """Why the test cannot run here ('' when it can)."""
    if os.environ.get("RECONTRAST_TEST_VIRTUALENV", "") not in ("1", "true", "yes"):
        return "opt-in: set RECONTRAST_TEST_VIRTUALENV=1 (creates a several-GB environment, ~4 min)"
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return "MLflow's virtualenv manager needs pyenv on PATH"
    res = subprocess.run([pyenv, "versions", "--bare"], capture_output=True, text=True, timeout=60)
    if platform.python_version() not in res.stdout.split():
        return f"pyenv has no Python {platform.python_version()} (offline it cannot install one)"
    return ""


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(bool(_pyenv_has_this_python()), reason=_pyenv_has_this_python() or "runs"),
]


def test_mlflow_models_serve_virtualenv_installs_the_logged_wheel(tiny_tile, mlflow_tracking, tmp_path):
    from recontrast_core.mlops.registry import get_client

    bundle = train_tiny(tiny_tile, tmp_path / "run")
    images = tile_test_images(tiny_tile)
    reference = load_detector(bundle, device="cpu").predict(images, return_map=True)
    name = f"venv-{uuid.uuid4().hex[:8]}"
    register_champion(bundle, name, get_client(mlflow_tracking.url))

    keep = os.environ.get("RECONTRAST_TEST_MLFLOW_ENV_ROOT", "").strip()
    env_root = Path(keep) if keep else tmp_path / "envs"
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**server_env(mlflow_tracking.url), "MLFLOW_ENV_ROOT": str(env_root), PATH_ROOT_ENV: str(tiny_tile),
           "PIP_PROGRESS_BAR": "off"}
    # nothing of this checkout may leak into the new environment's imports
    env.pop("PYTHONPATH", None)
    server = ServerProcess(
        [str(mlflow_bin), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "virtualenv",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        took = server.wait_for(f"{url}/ping", timeout=1500)
        print(f"\nmlflow models serve --env-manager virtualenv ready after {took:.0f}s "
              f"(environment created, installed, server started)", file=sys.stderr)

        (venv,) = [p for p in env_root.iterdir() if p.name.startswith("mlflow-")]
        site = next(venv.glob("lib/python*/site-packages"))
        installed = (site / "recontrast-0.1.0.dist-info" / "direct_url.json").read_text()
        assert "artifacts/recontrast-0.1.0-py3-none-any.whl" in installed, installed  # the logged wheel
        assert (site / "torch-2.14.1.dist-info").is_dir()
        assert (site / "recontrast_core" / "mlops" / "serving" / "model_code.py").is_file()

        b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
        status, body = http("POST", f"{url}/invocations", {"dataframe_records": [{"image_b64": b} for b in b64],
                                                           "params": {"return_map": True}})
        assert status == 200, body
        got = body["predictions"]
        s = np.array([p["score"] for p in got])
        s_ref = np.array([r["score"] for r in reference])
        rel = float(np.max(np.abs(s - s_ref) / np.abs(s_ref)))
        print(f"max relative score difference (new environment vs this one): {rel:.2e}", file=sys.stderr)
        assert rel <= SCORE_RTOL, (s, s_ref)
        assert [p["decision"] for p in got] == [r["decision"] for r in reference]
        assert np.allclose(np.asarray(got[0]["anomaly_map"], dtype=np.float32), reference[0]["anomaly_map"],
                           rtol=1e-5, atol=1e-6)

        split = {"columns": ["path"], "data": [[str(images[0])], [str(tmp_path / "serve.log")]]}
        status, body = http("POST", f"{url}/invocations", {"dataframe_split": split})
        assert status == 400 and body["message"].endswith(f"row 1 (path): {PATH_REFUSED}"), body
    finally:
        server.stop()
        print(f"virtualenv test: {time.monotonic() - start:.0f}s from start to stop", file=sys.stderr)
        if not keep:
            shutil.rmtree(env_root, ignore_errors=True)  # several GB
