"""Real servers on loopback for integration tests.

* ``moto_s3``: a moto S3 server (``ThreadedMotoServer``) on a free port; yields a
  :class:`S3Server` with ``endpoint_url``, credentials, ``env()`` for clients and
  ``client()`` for boto3. Bucket ``mlflow-artifacts`` exists.
* ``mlflow_server``: ``mlflow server`` (SQLite backend, one worker) as a subprocess whose
  artifact store is ``s3://mlflow-artifacts/`` on the moto server (proxied artifacts:
  clients upload through the MLflow server and need no S3 credentials).
* ``mlflow_server_local``: same, with a local artifact directory.
* ``start_mlflow_server(...)``: the helper behind both, for other suites (e2e).

Servers are session-scoped and killed at teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

S3_KEY_ID = "testing-key-id"
S3_SECRET = "testing-secret-key"
ARTIFACT_BUCKET = "mlflow-artifacts"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint_url: str
    access_key_id: str = S3_KEY_ID
    secret_access_key: str = S3_SECRET
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    try:
        s3.client().create_bucket(Bucket=ARTIFACT_BUCKET)
        yield s3
    finally:
        server.stop()


@dataclass
class MlflowServer:
    url: str
    backend_uri: str
    artifacts_destination: str
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_mlflow_server(
    workdir: Path, artifacts_destination: str, env: Optional[dict] = None, timeout: float = 90
) -> MlflowServer:
    """Start ``mlflow server`` on a free loopback port and wait for ``/health``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", artifacts_destination,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]
    # No background job runner (a second process importing MLflow): tests need none of it.
    full_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    log_path = workdir / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = MlflowServer(f"http://127.0.0.1:{port}", backend, artifacts_destination, log_path, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.3)
    stop_mlflow_server(server)
    raise RuntimeError(f"mlflow server not healthy after {timeout}s:\n{server.log_tail()}")


def stop_mlflow_server(server: MlflowServer) -> None:
    """Stop the server's process group (the server and its worker), by its own pid."""
    proc = server.process
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, moto_s3) -> Iterator[MlflowServer]:
    """MLflow server on loopback with S3 (moto) artifacts."""
    work = tmp_path_factory.mktemp("mlflow-s3")
    server = start_mlflow_server(work, f"s3://{ARTIFACT_BUCKET}/", env=moto_s3.env())
    try:
        yield server
    finally:
        stop_mlflow_server(server)


@pytest.fixture(scope="session")
def mlflow_server_local(tmp_path_factory) -> Iterator[MlflowServer]:
    """MLflow server on loopback with a local artifact directory."""
    work = tmp_path_factory.mktemp("mlflow-local")
    server = start_mlflow_server(work, str(work / "artifacts"))
    try:
        yield server
    finally:
        stop_mlflow_server(server)


@pytest.fixture
def mlflow_tracking(mlflow_server, monkeypatch):
    """Point this test's MLflow client at the S3-backed server; restore afterwards."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    try:
        yield mlflow_server
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
