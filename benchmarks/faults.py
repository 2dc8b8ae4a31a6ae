"""Fault injection: kill -9 mid-training, concurrent registry writers, flaky S3.

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
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/faults"))
    p.add_argument("--kill", type=int, default=10)
    p.add_argument("--register", type=int, default=10)
    p.add_argument("--sequences", type=int, default=100)
    p.add_argument("--s3-rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
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
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    (args.out / "faults.json").write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out / 'faults.json'} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
