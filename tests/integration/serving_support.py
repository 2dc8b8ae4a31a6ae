"""Shared by the serving tests: a tiny real bundle, its registration, server processes.

* :func:`train_tiny`: a 64 px, 2-iteration bundle (CPU) on the ``tiny_tile`` subset of
  magnetic-tile-dev (the fixture skips where the data is absent), as in test_export.py;
* :func:`register_champion`: ``log_pyfunc`` (registered) + ``force_promote`` to champion;
* :class:`ServerProcess`: a server started as a subprocess in its own process group,
  waited for on an HTTP path, killed (by its own group id) in ``stop``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from recontrast_core.config import BackboneConfig, TrainConfig
from recontrast_core.data.layouts import read_mvtec
from recontrast_core.train import train_model

SMALL = dict(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
             device="cpu", log_every=1, checkpoint_every=2)


def train_tiny(tiny_tile: Path, out: Path, seed: int = 111) -> Path:
    cfg = TrainConfig(backbone=BackboneConfig(name="tf_efficientnet_lite0"), seed=seed, **SMALL)
    return train_model(read_mvtec(tiny_tile), cfg, out, progress=False).bundle_dir


def tile_test_images(tiny_tile: Path) -> list[Path]:
    images = sorted(p for p in (tiny_tile / "test").rglob("*") if p.is_file())
    assert len(images) == 10
    return images


def register_champion(bundle: Path, name: str, client) -> str:
    """Log ``bundle`` as the pyfunc model, register it under ``name``, make it champion."""
    import mlflow

    from recontrast_core.mlops.serving.pyfunc_model import log_pyfunc
    from recontrast_core.mlops.registry import force_promote

    with mlflow.start_run():
        info = log_pyfunc(bundle, registered_model_name=name, device="cpu")
    version = str(info.registered_model_version)
    assert force_promote(name, version, "serving test", client=client).promote
    return version


def server_env(tracking_uri: str) -> dict[str, str]:
    """The environment of a server: this interpreter's bin first on PATH (``mlflow models
    serve`` execs ``uvicorn``), the tracking URI, the CPU, and as many threads as this test
    process scores its references with: float sums split over another number of threads
    round differently (a server on 1 thread against references on 2 differed by ~1e-6
    relative, which the normalisation's slope made 4e-5: the "served != trained" failure)."""
    import torch

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri, "RECONTRAST_DEVICE": "cpu",
            "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}


def http(method: str, url: str, payload: Optional[dict] = None, timeout: float = 120) -> tuple[int, dict | str]:
    """One real HTTP request; returns (status, JSON body or text)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class ServerProcess:
    """``cmd`` in its own process group, output in ``log``."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_for(self, url: str, timeout: float = 240) -> float:
        """Poll ``url`` until it answers 200; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - start
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{url} not answering 200 after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._out.close()
