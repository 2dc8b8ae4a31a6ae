"""Fault injection: kill -9 mid-training, concurrent registry writers, flaky S3, full disks,
hostile files.

    python benchmarks/faults.py --out runs/faults             # the full suite (about 15-25 min)
    python benchmarks/faults.py --kill 2 --register 4 --sequences 3 --s3-rounds 1   # CI-sized

Prints figures and writes ``OUT/faults.json``; asserts nothing (tests/integration/
test_faults.py runs a small subset and checks the figures). Everything runs on loopback:
a real ``mlflow server``, a moto S3 server and a small TCP proxy in front of it that resets
connections, answers 500 and stalls.

* **kill**: a small real training run (`recontrast train`, tiny subset of
  magnetic-tile-dev, checkpoints every 2 iterations) killed with SIGKILL at a random moment
  (after the k-th checkpoint write started, k in 1..5, plus a random delay), with writes
  slowed (``RECONTRAST_FAILPOINT_WRITE_SLEEP``) so that some kills land inside a checkpoint
  write; then resumed (``--resume``) to the end. Each trial must end with the
  uninterrupted run's weights and reported final loss.
* **register**: N threads register the same pipeline run at once: exactly one version.
* **sequences**: random candidates (random metrics), then random concurrent gated
  promotions, forced promotions and rollbacks. Counted: promotions of a model not better
  than the champion it was compared with (forced ones aside) and broken invariants.
* **s3**: ingest from S3 and an MLflow bundle upload/download, with the S3 endpoint behind
  the faulty proxy: they must finish identical to the source, or fail with a clear error;
  zero half-written artifacts.
* **disk_full**: ``RECONTRAST_FAILPOINT_ENOSPC_AT=N`` at every write point N of train,
  evaluate, predict, export and batch scoring (each run a real process): one line, exit 2,
  no temporary file, the folder never marked complete, and the register step given a
  failed step's output refuses it (versions registered: 0). Then (as root) a real tmpfs of
  24 KB .. 20 MB as ``--out``: each run succeeds whole or fails the same clean way.
* **hostile**: deep and oversized JSON, bad bundle numbers, truncated weights, a checkpoint
  that would run code, a decompression bomb, a symlink leaving the dataset, a binary
  settings file: one line naming the file, exit 2, no traceback, no code run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "magnetic-tile-dev"
# --kind recontrast: the suite kills and resumes ReContrast's training loop (checkpoints)
TRAIN_ARGS = ["--kind", "recontrast", "--image-size", "64", "--iterations", "12", "--batch-size", "4", "--set", "train.decoder_blocks=[1,1,1]",
              "--set", "train.bottleneck_blocks=1", "--set", "train.checkpoint_every=2", "--set", "train.log_every=3",
              "--device", "cpu", "--no-progress", "--json"]


# ----------------------------------------------------------------------------- helpers
def tiny_dataset(root: Path, src: Path = DATA) -> Path:
    """8 normal training images and 2 + 2 test images of magnetic-tile-dev, MVTec layout."""
    dst = root / "tiles"
    if dst.is_dir():
        return dst
    picks = {"train/good": 8, "test/good": 2, "test/crack": 2}
    for rel, n in picks.items():
        for f in sorted((src / rel).iterdir())[:n]:
            (dst / rel).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / rel / f.name)
            if rel == "test/crack":
                mask = src / "ground_truth" / "crack" / f"{f.stem}_mask.png"
                (dst / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, dst / "ground_truth" / "crack" / mask.name)
    return dst


def _cli(*args, env=None, **kw) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "recontrast_core.cli", *map(str, args)], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _bundle_state(bundle: Path):
    from safetensors.torch import load_file

    return load_file(str(bundle / "model.safetensors")), json.loads((bundle / "bundle.json").read_text())["training"]


# ----------------------------------------------------------------------------- kill -9
def kill_trials(n: int, work: Path, seed: int = 0, write_sleep: float = 0.4) -> dict:
    import torch

    rng = random.Random(seed)
    data = tiny_dataset(work)
    ref_out = work / "kill-ref"
    t0 = time.perf_counter()
    ref = _cli("train", data, "--out", ref_out, *TRAIN_ARGS)
    out, err = ref.communicate(timeout=600)
    if ref.returncode != 0:
        raise RuntimeError(f"reference run failed: {err[-2000:]}")
    ref_wall = time.perf_counter() - t0
    ref_state, ref_training = _bundle_state(ref_out / "bundle")
    env = {"RECONTRAST_FAILPOINT_WRITE_SLEEP": str(write_sleep)}
    trials = []
    for i in range(n):
        run_dir = work / f"kill-{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = _cli("train", data, "--out", run_dir, *TRAIN_ARGS, env=env, start_new_session=True)
        ckpt_dir = run_dir / "checkpoints"
        # A random moment anchored to progress, not to the clock (a busy machine runs slower):
        # after the k-th checkpoint write has started (its temp file appears) plus a random
        # delay within one slowed write, so some kills land inside a write and some between.
        k, extra = rng.randint(1, 5), rng.uniform(0.0, 2 * write_sleep)
        seen, t0, delay = set(), time.perf_counter(), None
        while proc.poll() is None and delay is None:
            if ckpt_dir.is_dir():
                seen.update(p.name for p in ckpt_dir.glob(".last.pt.*.tmp"))
            if len(seen) >= k:
                time.sleep(extra)
                delay = time.perf_counter() - t0
            time.sleep(0.02)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        delay = delay if delay is not None else time.perf_counter() - t0
        temps = [p.name for p in ckpt_dir.glob(".*.tmp")] if ckpt_dir.is_dir() else []
        resumes = 0
        while not (run_dir / "bundle" / "bundle.json").is_file():
            resume = (ckpt_dir / "last.pt").is_file()
            r = _cli("train", data, "--out", run_dir, *TRAIN_ARGS, *(["--resume"] if resume else []))
            _, err = r.communicate(timeout=600)
            resumes += 1
            if r.returncode != 0 or resumes > 3:
                trials.append({"trial": i, "killed_at_s": round(delay, 2), "error": err.strip().splitlines()[-1:]})
                break
        else:
            state, training = _bundle_state(run_dir / "bundle")
            same = state.keys() == ref_state.keys() and all(torch.allclose(state[k], ref_state[k], atol=1e-6)
                                                             for k in state)
            trials.append({"trial": i, "killed": killed, "killed_at_s": round(delay, 2),
                           "inside_a_write": bool(temps), "resumes": resumes, "same_weights": same,
                           "same_final_loss": abs(training["final_loss"] - ref_training["final_loss"]) < 1e-6,
                           "history_points": len(training.get("history", [])),
                           "temp_files_after": [p.name for p in ckpt_dir.glob(".*.tmp")]})
    ok = [t for t in trials if t.get("same_weights") and t.get("same_final_loss") and not t.get("temp_files_after")]
    return {"trials": trials, "n": n, "ok": len(ok), "killed": sum(bool(t.get("killed")) for t in trials),
            "killed_inside_a_write": sum(bool(t.get("inside_a_write")) for t in trials),
            "reference_wall_s": round(ref_wall, 1)}


# ----------------------------------------------------------------------------- servers
class FaultyProxy:
    """TCP proxy on loopback in front of an HTTP server; each new connection is, at random,
    reset at once, answered with HTTP 500, stalled, or passed through."""

    def __init__(self, target_port: int, p_reset=0.15, p_500=0.15, p_slow=0.15, slow_s=1.5, seed=0):
        self.target = ("127.0.0.1", target_port)
        self.p = (p_reset, p_500, p_slow)
        self.slow_s = slow_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"reset": 0, "500": 0, "slow": 0, "pass": 0}
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _mode(self) -> str:
        with self.lock:
            r = self.rng.random()
            pr, p5, ps = self.p
            mode = "reset" if r < pr else "500" if r < pr + p5 else "slow" if r < pr + p5 + ps else "pass"
            self.counts[mode] += 1
            return mode

    def _handle(self, client: socket.socket) -> None:
        mode = self._mode()
        if mode == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()  # RST
            return
        if mode == "500":
            try:
                client.recv(65536)
                body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            finally:
                client.close()
            return
        if mode == "slow":
            time.sleep(self.slow_s)
        upstream = socket.create_connection(self.target)

        def pipe(a, b):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        t.start()
        pipe(client, upstream)
        t.join(timeout=60)
        client.close()
        upstream.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_moto():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


S3_ENV = {"AWS_ACCESS_KEY_ID": "faults-key", "AWS_SECRET_ACCESS_KEY": "faults-secret", "AWS_DEFAULT_REGION": "us-east-1"}


# ----------------------------------------------------------------------------- registry
def _candidate(client, name, metrics, fingerprint, tmp: Path):
    from recontrast_core.mlops import registry, tracking

    pid = f"pr-{uuid.uuid4().hex[:8]}"
    exp = client.get_experiment_by_name("faults") or client.get_experiment(client.create_experiment("faults"))
    run = client.create_run(exp.experiment_id, tags={"pipeline_run_id": pid})
    bundle = tmp / pid
    bundle.mkdir(parents=True)
    (bundle / "bundle.json").write_text(json.dumps({"format": "fake"}))
    tracking.log_bundle(bundle, run.info.run_id, "bundle", client=client)
    return registry.register_candidate(run.info.run_id, name, pid, metrics, fingerprint, artifact_path="bundle",
                                       client=client)


def concurrent_register(client, n: int, tmp: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from recontrast_core.mlops import registry, tracking

    name, pid = f"reg-{uuid.uuid4().hex[:8]}", f"pr-{uuid.uuid4().hex[:8]}"
    exp = client.get_experiment_by_name("faults") or client.get_experiment(client.create_experiment("faults"))
    runs = []
    for i in range(n):
        run = client.create_run(exp.experiment_id, tags={"pipeline_run_id": pid})
        b = tmp / f"{pid}-{i}"
        b.mkdir(parents=True)
        (b / "bundle.json").write_text("{}")
        tracking.log_bundle(b, run.info.run_id, "bundle", client=client)
        runs.append(run.info.run_id)
    registry.ensure_registered_model(client, name)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        versions = list(pool.map(lambda rid: registry.register_candidate(
            rid, name, pid, {"image_auroc": 0.9}, "f" * 64, artifact_path="bundle", client=client), runs))
    return {"callers": n, "distinct_versions_returned": len(set(versions)),
            "versions_in_registry": len(client.search_model_versions(f"name = '{name}'")),
            "wall_s": round(time.perf_counter() - t0, 2)}


def promotion_sequences(client, n: int, tmp: Path, seed: int = 0) -> dict:
    """Random candidates, then random concurrent gated/forced promotions and rollbacks."""
    from concurrent.futures import ThreadPoolExecutor

    from recontrast_core.errors import UserError
    from recontrast_core.mlops import registry
    from recontrast_core.promotion import PromotionPolicy

    rng = random.Random(seed)
    # Concurrency of the gate, not the baseline floor: these synthetic candidates have no
    # training-free baseline, so the floor (which fails closed) is off.
    policy = PromotionPolicy(floors={"image_auroc": 0.5}, margin=0.005, baseline_floor=False)
    worse, broken, actions, forced = 0, 0, 0, 0
    details = []
    for s in range(n):
        name = f"seq-{uuid.uuid4().hex[:8]}"
        versions = [_candidate(client, name, {"image_auroc": round(rng.uniform(0.55, 0.99), 3)}, "f" * 64, tmp)
                    for _ in range(rng.randint(3, 5))]
        ops = []
        for _ in range(rng.randint(3, 6)):
            kind = rng.choices(["gate", "force", "rollback"], weights=[6, 2, 2])[0]
            ops.append((kind, rng.choice(versions)))

        def act(op):
            kind, v = op
            try:
                if kind == "gate":
                    return kind, v, registry.promote_if_better(client, name, v, policy).promote
                if kind == "force":
                    return kind, v, registry.force_promote(name, v, "fault suite", client=client).promote
                return kind, v, registry.rollback(name, client=client)["champion"]
            except UserError as exc:  # nothing to roll back to: a valid serial outcome
                return kind, v, f"refused: {exc}"

        with ThreadPoolExecutor(len(ops)) as pool:
            results = list(pool.map(act, ops))
        actions += len(ops)
        forced += sum(k == "force" for k, _ in ops)
        problems = registry.check_invariants(client, name)
        broken += bool(problems)
        for mv in client.search_model_versions(f"name = '{name}'"):
            tags = mv.tags or {}
            if tags.get("promotion_decision") == "promoted" and "champion_image_auroc" in tags:
                if float(tags["metric.image_auroc"]) <= float(tags["champion_image_auroc"]) + policy.margin:
                    worse += 1
        if problems:
            details.append({"sequence": s, "problems": problems, "results": results})
    return {"sequences": n, "actions": actions, "forced": forced, "worse_promotions": worse,
            "broken_invariants": broken, "details": details[:5]}


# ----------------------------------------------------------------------------- S3 faults
def s3_faults(rounds: int, work: Path, seed: int = 0) -> dict:
    import boto3

    from recontrast_core.steps.settings import apply_overrides

    server, port = start_moto()
    proxy = FaultyProxy(port, seed=seed)
    env_before = dict(os.environ)
    os.environ.update(S3_ENV)
    os.environ["AWS_MAX_ATTEMPTS"] = "10"
    results = {"ingest": [], "mlflow_bundle": []}
    try:
        direct = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        direct.create_bucket(Bucket="data")
        direct.create_bucket(Bucket="artifacts")
        data = tiny_dataset(work)
        files = sorted(p for p in data.rglob("*") if p.is_file())
        for f in files:
            direct.upload_file(str(f), "data", f"tiles/{f.relative_to(data)}")
        from recontrast_core import steps

        for r in range(rounds):
            out = work / f"s3-ingest-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = apply_overrides(None, {"data.source": "s3://data/tiles", "data.s3_endpoint_url": proxy.url})
            t0 = time.perf_counter()
            try:
                steps.ingest(out, cfg)
                got = sorted(p.relative_to(out / "data") for p in (out / "data").rglob("*")
                             if p.is_file() and not p.name.startswith("."))
                same = got == [f.relative_to(data) for f in files] and all(
                    (out / "data" / f.relative_to(data)).read_bytes() == f.read_bytes() for f in files)
                partial = [p.name for p in (out / "data").rglob("*.part")]
                results["ingest"].append({"ok": True, "identical": same, "partial_files": partial,
                                          "wall_s": round(time.perf_counter() - t0, 1)})
            except Exception as exc:  # a clear error is acceptable; a half-written manifest is not
                results["ingest"].append({"ok": False, "error": str(exc)[:200],
                                          "manifest_written": (out / "manifest.json").exists()})
        # a bundle through an MLflow server whose artifact store is S3 behind the proxy
        sys.path.insert(0, str(REPO))
        from tests.integration.conftest import start_mlflow_server, stop_mlflow_server

        mlflow_env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "10"}
        server_ml = start_mlflow_server(work / "mlflow-s3", "s3://artifacts/", env=mlflow_env)
        try:
            from recontrast_core.mlops import tracking

            client = tracking.get_client(server_ml.url)
            exp = client.create_experiment(f"s3-{uuid.uuid4().hex[:6]}")
            bundle = work / "bundle"
            bundle.mkdir(exist_ok=True)
            (bundle / "bundle.json").write_text(json.dumps({"x": 1}))
            (bundle / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024))
            for r in range(rounds):
                run = client.create_run(exp)
                t0 = time.perf_counter()
                try:
                    tracking.log_bundle(bundle, run.info.run_id, "bundle", client=client)
                    dl = Path(tempfile.mkdtemp(dir=work))
                    client.download_artifacts(run.info.run_id, "bundle", str(dl))
                    same = all((dl / "bundle" / f).read_bytes() == (bundle / f).read_bytes()
                               for f in ("bundle.json", "model.safetensors"))
                    results["mlflow_bundle"].append({"ok": True, "identical": same,
                                                     "wall_s": round(time.perf_counter() - t0, 1)})
                except Exception as exc:
                    results["mlflow_bundle"].append({"ok": False, "error": str(exc)[:200]})
        finally:
            stop_mlflow_server(server_ml)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        proxy.close()
        server.stop()
    results["proxy_connections"] = dict(proxy.counts)
    return results


# ----------------------------------------------------------------------------- driver
# ----------------------------------------------------------------------------- disk full
DISK_TRAIN_ARGS = ["--kind", "recontrast", "--image-size", "64", "--iterations", "4", "--batch-size", "4",
                   "--set", "train.decoder_blocks=[1,1,1]", "--set", "train.bottleneck_blocks=1",
                   "--set", "train.checkpoint_every=2", "--device", "cpu", "--no-progress"]


def _temporaries(root: Path) -> list[str]:
    """Temporary files and staging folders left anywhere under ``root``."""
    if not root.exists():
        return []
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.endswith((".tmp", ".part", ".old")) or ".tmp." in p.name or p.name.startswith(".overlays.")]


def _marker(out: Path) -> Optional[str]:
    from recontrast_core.filenames import STEP_MARKER_FILE

    f = out / STEP_MARKER_FILE
    return json.loads(f.read_text()).get("status") if f.is_file() else None


def _one_line(err: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return "Traceback" not in err and len(lines) == 1


def _disk_commands(data: Path, good: Path, work: Path) -> dict:
    """Each command (as a user runs it) as a function of its output folder."""
    bundle = good / "train" / "bundle"
    return {
        "train": lambda out: ["train", data, "--out", out, *DISK_TRAIN_ARGS],
        "evaluate": lambda out: ["evaluate", good / "train", data, "--out", out, "--device", "cpu", "--no-progress"],
        "predict": lambda out: ["predict", bundle, data / "test", "--out", out, "--device", "cpu", "--no-progress"],
        "export": lambda out: ["export", bundle, "--out", out, "--format", "onnx"],
    }


def _register_refused(bundle_dir: Path, report: Path, server_url: str) -> tuple[bool, str]:
    """The register step on a failed step's output: must refuse (exit != 0) and register nothing."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "recontrast_core.steps", "register", "--bundle", str(bundle_dir),
                        "--report", str(report), "--out", str(report.parent / "register.json"),
                        "--set", f"tracking.tracking_uri={server_url}", "--set", "registry.model_name=faults-disk",
                        "--no-progress"], capture_output=True, text=True, env=full, timeout=300)
    return r.returncode != 0, (r.stderr.strip().splitlines() or [""])[-1]


def disk_full_points(work: Path, server_url: Optional[str] = None, commands=("train", "evaluate", "predict", "export"),
                     batch: bool = True) -> dict:
    """``RECONTRAST_FAILPOINT_ENOSPC_AT=N`` at every write point N of each command (real
    processes): each failing run must print one line and exit 2, leave no temporary file,
    leave its folder not marked complete (evaluate: no metrics.json), and the register step
    given its output must refuse it (nothing registered)."""
    from recontrast_core.runtime import FAILPOINT_ENOSPC_ENV, WRITE_LOG_ENV

    data = tiny_dataset(work)
    good = work / "disk-good"
    r = _cli("train", data, "--out", good / "train", *DISK_TRAIN_ARGS)
    _, err = r.communicate(timeout=900)
    if r.returncode:
        raise RuntimeError(f"the reference training failed: {err[-2000:]}")
    r = _cli("evaluate", good / "train", data, "--out", good / "evaluate", "--device", "cpu", "--no-progress")
    _, err = r.communicate(timeout=900)
    if r.returncode:
        raise RuntimeError(f"the reference evaluation failed: {err[-2000:]}")
    cmds = _disk_commands(data, good, work)
    report: dict = {}
    for name in commands:
        clean = work / f"disk-{name}-clean"
        log = work / f"disk-{name}.log"
        log.unlink(missing_ok=True)
        p = _cli(*cmds[name](clean), env={WRITE_LOG_ENV: str(log)})
        _, err = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"{name}: the clean run failed: {err[-2000:]}")
        points = [ln.split("\t", 1)[1].replace(str(clean), "OUT") for ln in log.read_text().splitlines()]
        rows = []
        for n, target in enumerate(points, start=1):
            out = work / f"disk-{name}-{n}"
            p = _cli(*cmds[name](out), env={FAILPOINT_ENOSPC_ENV: str(n)})
            _, err = p.communicate(timeout=900)
            line = next((ln for ln in err.splitlines() if ln.startswith("error:")), "")
            row = {"n": n, "target": target, "exit": p.returncode, "one_line": _one_line(err),
                   "names_the_file": Path(target).name in line, "temporaries": _temporaries(out),
                   "marker": _marker(out)}
            half = bool(row["temporaries"]) or row["marker"] == "complete"
            if name == "evaluate":
                half = half or (out / "metrics.json").exists()
            if name == "export":
                half = half or (out / "export.json").exists()
            row["half_written"] = half
            if server_url and name in ("train", "evaluate"):
                bundle_dir = out if name == "train" else good / "train"
                report_dir = good / "evaluate" if name == "train" else out
                refused, why = _register_refused(bundle_dir, report_dir / "metrics.json", server_url)
                row["register_refused"], row["register_said"] = refused, why[:160]
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
        report[name] = {
            "write_points": len(points),
            "targets": sorted(set(points)),
            "clean_exit_2_one_line": sum(r_["exit"] == 2 and r_["one_line"] for r_ in rows),
            "names_the_file": sum(r_["names_the_file"] for r_ in rows),
            "half_written": sum(r_["half_written"] for r_ in rows),
            **({"registered_from_failed": sum(not r_["register_refused"] for r_ in rows)}
               if server_url and name in ("train", "evaluate") else {}),
            "failures": [r_ for r_ in rows if not (r_["exit"] == 2 and r_["one_line"]) or r_["half_written"]
                         or r_.get("register_refused") is False],
        }
        print(json.dumps({f"disk_full.{name}": {k: v for k, v in report[name].items() if k != "targets"}}), flush=True)
    if batch:
        report["batch"] = _disk_full_batch(data, good, work)
        print(json.dumps({"disk_full.batch": report["batch"]}), flush=True)
    if server_url:
        from recontrast_core.mlops import tracking

        client = tracking.get_client(server_url)
        try:
            report["registered_versions"] = len(client.search_model_versions("name='faults-disk'"))
        except Exception:  # noqa: BLE001 - no such model: nothing registered
            report["registered_versions"] = 0
    return report


def _disk_full_batch(data: Path, good: Path, work: Path) -> dict:
    """Batch scoring into a local folder, the failpoint at every write point, then a rerun
    with space: whole parts only, and every image exactly once after the rerun."""
    code = ("import sys; from recontrast_core.mlops.batch_scoring import run_batch_scoring as r; "
            "from recontrast_core.errors import UserError\n"
            "try: r(sys.argv[1], [sys.argv[2]], sys.argv[3], chunk_size=2, device='cpu', progress=False)\n"
            "except UserError as e: print(f'error: {e}', file=sys.stderr); sys.exit(2)")
    from recontrast_core.runtime import FAILPOINT_ENOSPC_ENV, WRITE_LOG_ENV

    def run(out: Path, env: dict) -> subprocess.CompletedProcess:
        full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
        return subprocess.run([sys.executable, "-c", code, str(good / "train" / "bundle"), str(data / "test"), str(out)],
                              capture_output=True, text=True, env=full, timeout=900)

    log = work / "disk-batch.log"
    log.unlink(missing_ok=True)
    if run(work / "disk-batch-clean", {WRITE_LOG_ENV: str(log)}).returncode:
        raise RuntimeError("batch: the clean run failed")
    n_points = len(log.read_text().splitlines())
    rows = []
    import pandas as pd

    from recontrast_core.data.images import is_image_filename

    n_images = sum(1 for f in (data / "test").rglob("*") if f.is_file() and is_image_filename(f.name))

    for n in range(1, n_points + 1):
        out = work / f"disk-batch-{n}"
        r = run(out, {FAILPOINT_ENOSPC_ENV: str(n)})
        temps = _temporaries(out)
        again = run(out, {})
        table = pd.read_parquet(out / "results.parquet") if (out / "results.parquet").is_file() else None
        rows.append({"n": n, "exit": r.returncode, "one_line": _one_line(r.stderr), "temporaries": temps,
                     "rerun_ok": again.returncode == 0 and table is not None and table.iloc[:, 0].is_unique
                     and len(table) == n_images})
        shutil.rmtree(out, ignore_errors=True)
    return {"write_points": n_points, "clean_exit_2_one_line": sum(r["exit"] == 2 and r["one_line"] for r in rows),
            "half_written": sum(bool(r["temporaries"]) for r in rows), "rerun_every_image_once": sum(r["rerun_ok"] for r in rows),
            "failures": [r for r in rows if not (r["exit"] == 2 and r["one_line"]) or r["temporaries"] or not r["rerun_ok"]]}


def disk_full_tmpfs(work: Path, sizes_kb=(24, 256, 2048, 20480)) -> dict:
    """A real full disk: each command with ``--out`` on a tmpfs of each size (root only:
    ``mount -t tmpfs``). Each run succeeds whole or fails with one line, exit 2, no
    temporary file and no folder marked complete."""
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    data = tiny_dataset(work)
    good = work / "disk-good"
    cmds = _disk_commands(data, good, work)
    mnt = work / "tmpfs"
    mnt.mkdir(exist_ok=True)
    rows = []
    for kb in sizes_kb:
        for name in ("train", "evaluate", "predict", "export"):
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(mnt)],
                                     capture_output=True, text=True)
            if mounted.returncode:
                return {"skipped": f"mount failed: {mounted.stderr.strip()}"}
            try:
                out = mnt / name
                p = _cli(*cmds[name](out))
                _, err = p.communicate(timeout=900)
                row = {"size_kb": kb, "command": name, "exit": p.returncode,
                       "one_line": p.returncode == 0 or _one_line(err),
                       "disk_full_said": "no space left on device" in err, "temporaries": _temporaries(out),
                       "marker": _marker(out)}
                row["half_written"] = bool(row["temporaries"]) or (p.returncode != 0 and row["marker"] == "complete")
                rows.append(row)
            finally:
                subprocess.run(["umount", str(mnt)], capture_output=True)
    failed = [r for r in rows if r["exit"] != 0]
    return {"runs": len(rows), "succeeded": len(rows) - len(failed),
            "failed_clean": sum(r["exit"] == 2 and r["one_line"] and r["disk_full_said"] for r in failed),
            "half_written": sum(r["half_written"] for r in rows),
            "bad": [r for r in rows if r["half_written"] or (r["exit"] != 0 and not (r["exit"] == 2 and r["one_line"]))],
            "table": [{k: r[k] for k in ("size_kb", "command", "exit")} for r in rows]}


# ----------------------------------------------------------------------------- hostile files
def hostile_files(work: Path) -> dict:
    """Files a hostile or careless user hands the tool, each through the real CLI: one
    line naming the file, exit 2, never a traceback."""
    import numpy as np
    import torch
    from PIL import Image

    data = tiny_dataset(work)
    good = work / "disk-good"
    bundle = good / "train" / "bundle"
    if not (bundle / "bundle.json").is_file():
        r = _cli("train", data, "--out", good / "train", *DISK_TRAIN_ARGS)
        r.communicate(timeout=900)
    h = work / "hostile"
    shutil.rmtree(h, ignore_errors=True)
    h.mkdir()
    cases: dict[str, tuple[list, str]] = {}

    def dataset_copy(name: str) -> Path:
        return Path(shutil.copytree(data, h / name))

    deep = "[" * 100_000 + "]" * 100_000
    ds = dataset_copy("deep-labelme")
    (ds / "train" / "good" / "x.json").write_text('{"shapes": ' + deep + "}")
    cases["JSON nested 100,000 deep in a dataset folder"] = (["data", "check", ds], "x.json")
    b = Path(shutil.copytree(bundle, h / "deep-bundle"))
    (b / "bundle.json").write_text(deep)
    cases["bundle.json nested 100,000 deep"] = (["predict", b, data / "test", "--out", h / "o1"], "bundle.json")
    for label, edit, field in (("n_normal 1e400", ("calibration", "n_normal", "1e400"), "n_normal"),
                               ("std [0,0,0]", ("preprocessing", "std", [0, 0, 0]), "std"),
                               ("mean 'abc'", ("preprocessing", "mean", "abc"), "mean")):
        b = Path(shutil.copytree(bundle, h / f"bundle-{field}"))
        text = (b / "bundle.json").read_text()
        meta = json.loads(text)
        meta[edit[0]][edit[1]] = edit[2]
        raw = json.dumps(meta)
        if edit[2] == "1e400":
            raw = raw.replace('"1e400"', "1e400")
        (b / "bundle.json").write_text(raw)
        cases[f"bundle {label}"] = (["predict", b, data / "test", "--out", h / f"o-{field}"], field)
    b = Path(shutil.copytree(bundle, h / "truncated-weights"))
    w = next(b.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:1000])
    cases["truncated weights"] = (["predict", b, data / "test", "--out", h / "o2"], w.name)

    class _Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(h / "PWNED"),))

    t = h / "evil-train"
    (t / "checkpoints").mkdir(parents=True)
    torch.save({"model": _Evil()}, t / "checkpoints" / "last.pt")
    cases["checkpoint that would run code"] = (["train", data, "--out", t, "--resume", *DISK_TRAIN_ARGS], "last.pt")
    ds = dataset_copy("bomb")
    bomb = ds / "train" / "good" / "bomb.png"
    Image.fromarray(np.zeros((1, 1), np.uint8)).resize((20000, 20000)).save(bomb, optimize=True)
    cases["decompression bomb (400 MP PNG)"] = (["data", "check", ds], "bomb.png")
    ds = dataset_copy("symlink")
    outside = h / "outside.png"
    shutil.copy(next((data / "test" / "good").iterdir()), outside)
    (ds / "train" / "good" / "link.png").symlink_to(outside)
    cases["symlink leaving the dataset root"] = (["data", "check", ds], "link.png")
    settings = h / "settings.bin"
    settings.write_bytes(bytes(range(256)) * 4)
    cases["binary settings file"] = (["train", data, "--out", h / "o3", "--config", settings], "settings.bin")
    big = h / "big.json"
    big.write_text(json.dumps({"x": "a" * 3_000_000}))
    b = Path(shutil.copytree(bundle, h / "big-bundle"))
    shutil.copy(big, b / "bundle.json")
    cases["bundle.json over the size limit (RECONTRAST_JSON_MAX_MB=1)"] = (
        ["predict", b, data / "test", "--out", h / "o4"], "bundle.json")
    rows = []
    for label, (args, must_name) in cases.items():
        env = {"RECONTRAST_JSON_MAX_MB": "1"} if "size limit" in label else {}
        p = _cli(*args, env=env)
        out, err = p.communicate(timeout=900)
        text = out + err
        # `data check` lists each problem on a "problem:" line (exit 2); other commands print "error:"
        said = [ln.strip() for ln in text.splitlines() if ln.startswith("error:") or ln.strip().startswith("problem:")]
        line = said[0] if said else ""
        rows.append({"case": label, "exit": p.returncode, "one_line": "Traceback" not in text and len(said) == 1,
                     "names_it": must_name in line, "said": line[:200]})
    return {"cases": len(rows), "clean": sum(r["exit"] == 2 and r["one_line"] and r["names_it"] for r in rows),
            "code_ran": (h / "PWNED").exists(), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/faults"))
    p.add_argument("--kill", type=int, default=10)
    p.add_argument("--register", type=int, default=10)
    p.add_argument("--sequences", type=int, default=100)
    p.add_argument("--s3-rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disk-full", action=argparse.BooleanOptionalAction, default=True,
                   help="the failpoint at every write point, and real full tmpfs folders (root)")
    p.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True, help="hostile input files")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"error: {DATA} not found (the kill and S3 trials use real images)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    report: dict = {}
    t_all = time.perf_counter()
    if args.kill:
        report["kill"] = kill_trials(args.kill, work, args.seed)
        print(json.dumps({"kill": {k: v for k, v in report["kill"].items() if k != "trials"}}), flush=True)
    if args.register or args.sequences:
        sys.path.insert(0, str(REPO))
        from tests.integration.conftest import start_mlflow_server, stop_mlflow_server

        server = start_mlflow_server(work / "mlflow", str(work / "mlflow-artifacts"))
        try:
            from recontrast_core.mlops import tracking

            client = tracking.get_client(server.url)
            if args.register:
                report["register"] = concurrent_register(client, args.register, work / "reg")
                print(json.dumps({"register": report["register"]}), flush=True)
            if args.sequences:
                report["sequences"] = promotion_sequences(client, args.sequences, work / "seq", args.seed)
                print(json.dumps({"sequences": {k: v for k, v in report["sequences"].items() if k != "details"}}),
                      flush=True)
        finally:
            stop_mlflow_server(server)
    if args.s3_rounds:
        report["s3"] = s3_faults(args.s3_rounds, work, args.seed)
        print(json.dumps({"s3": report["s3"]}), flush=True)
    if args.disk_full:
        from tests.integration.conftest import start_mlflow_server, stop_mlflow_server

        server = start_mlflow_server(work / "mlflow-disk", str(work / "mlflow-disk-artifacts"))
        try:
            report["disk_full"] = disk_full_points(work, server.url)
        finally:
            stop_mlflow_server(server)
        report["disk_full"]["tmpfs"] = disk_full_tmpfs(work)
        print(json.dumps({"disk_full.tmpfs": {k: v for k, v in report["disk_full"]["tmpfs"].items() if k != "table"}}),
              flush=True)
        print(json.dumps({"disk_full.registered_versions": report["disk_full"].get("registered_versions")}), flush=True)
    if args.hostile:
        report["hostile"] = hostile_files(work)
        print(json.dumps({"hostile": {k: v for k, v in report["hostile"].items() if k != "rows"}}), flush=True)
        for row in report["hostile"]["rows"]:
            print(f"  {row['case']}: exit {row['exit']}, one line {row['one_line']}, names it {row['names_it']}: "
                  f"{row['said']}", flush=True)
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    (args.out / "faults.json").write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out / 'faults.json'} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
