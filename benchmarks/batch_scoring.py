"""Batch-scoring throughput on loopback, and S3 reads under injected faults.

    OMP_NUM_THREADS=1 python benchmarks/batch_scoring.py --images 60            # about 2-4 min on 2 CPUs
    OMP_NUM_THREADS=1 python benchmarks/batch_scoring.py --images 60 --no-faults

Prints one JSON document; asserts nothing. A tiny real bundle (64 px, 2 iterations, one
block per decoder stage, or ``--bundle``) scores ``--images`` real magnetic-tile images:

* ``local``: folder -> folder (no S3: the scoring cost alone);
* ``s3``: moto S3 prefix -> S3 prefix (a ``moto_server`` subprocess, so it does not share
  this process's GIL), with and without overlays;
* ``faults``: the same S3 run with the endpoint behind ``benchmarks/faults.py``'s TCP proxy
  (per new connection: reset 15 %, HTTP 500 15 %, 1.5 s stall 15 %); a run that stops with
  an error is restarted (it resumes from its parts) until it completes; the table must
  then equal the fault-free run's (same images, same scores).

``images_per_s`` is the scoring phase of the run (listing, downloads, scoring, overlays,
part uploads), without model loading and the final merge; ``wall_s`` is the whole call.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

from faults import DATA, S3_ENV, FaultyProxy, tiny_dataset  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_process() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def tiny_bundle(work: Path) -> Path:
    from recontrast_core.config import TrainConfig
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.train import train_model

    cfg = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                      device="cpu", log_every=1, checkpoint_every=2)
    return train_model(read_mvtec(tiny_dataset(work)), cfg, work / "train", progress=False).bundle_dir


def images(n: int) -> list[Path]:
    folders = sorted(p for p in (DATA / "test").iterdir() if p.is_dir())
    per = -(-n // len(folders))
    return [f for d in folders for f in sorted(d.iterdir())[:per]][:n]


def timed(fn, **kw) -> dict:
    from recontrast_core.errors import UserError

    t0 = time.perf_counter()
    try:
        s = fn(**kw)
    except UserError as exc:
        return {"ok": False, "error": str(exc)[:300], "wall_s": round(time.perf_counter() - t0, 2)}
    return {"ok": True, "images": s["images"], "scored": s["scored"], "reused": s["reused"],
            "images_per_s": s["images_per_s"], "scoring_s": s["scoring_s"], "wall_s": round(time.perf_counter() - t0, 2)}


def scores(client, bucket: str, prefix: str) -> dict:
    import pyarrow.parquet as pq

    body = client.get_object(Bucket=bucket, Key=f"{prefix}results.parquet")["Body"].read()
    return {r["path"]: r["score"] for r in pq.read_table(io.BytesIO(body)).to_pylist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--fault-rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} not found (the benchmark scores real images)")
    os.environ.update(S3_ENV)
    from recontrast_core.mlops.batch_scoring import run_batch_scoring

    work = Path(tempfile.mkdtemp(prefix="recontrast-batch-bench-"))
    moto, url = start_moto_process()
    report: dict = {"images": args.images, "chunk_size": args.chunk_size, "torch_threads": None}
    try:
        import boto3
        import torch

        report["torch_threads"] = torch.get_num_threads()
        bundle = args.bundle or tiny_bundle(work)
        files = images(args.images)
        local_in = work / "in"
        local_in.mkdir()
        for f in files:
            shutil.copy(f, local_in / f"{f.parent.name}-{f.name}")
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket="bench")
        for f in files:
            client.upload_file(str(f), "bench", f"in/{f.parent.name}/{f.name}")
        common = dict(model_uri=str(bundle), chunk_size=args.chunk_size, progress=False, device="cpu")
        report["local"] = timed(run_batch_scoring, inputs=[local_in], output=work / "out-local", **common)
        os.environ["AWS_ENDPOINT_URL_S3"] = url
        report["s3"] = timed(run_batch_scoring, inputs=["s3://bench/in/"], output="s3://bench/out-s3/", **common)
        report["s3_no_overlays"] = timed(run_batch_scoring, inputs=["s3://bench/in/"], output="s3://bench/out-s3-no/",
                                         overlays=False, **common)
        report["s3_rerun_all_reused"] = timed(run_batch_scoring, inputs=["s3://bench/in/"],
                                              output="s3://bench/out-s3/", **common)
        if not args.no_faults:
            reference = scores(client, "bench", "out-s3/")
            proxy = FaultyProxy(int(url.rsplit(":", 1)[1]), seed=0)
            os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
            rounds = []
            for r in range(args.fault_rounds):
                out = f"out-faults-{r}/"
                attempts = []
                while len(attempts) < 5:
                    attempts.append(timed(run_batch_scoring, inputs=["s3://bench/in/"], output=f"s3://bench/{out}",
                                          **common))
                    if attempts[-1]["ok"]:
                        break
                got = scores(client, "bench", out) if attempts[-1]["ok"] else {}
                same = got.keys() == reference.keys() and all(abs(got[k] - reference[k]) < 1e-6 for k in got)
                rounds.append({"attempts": attempts, "identical_to_fault_free": same})
            report["faults"] = {"rounds": rounds, "proxy_connections": dict(proxy.counts)}
            proxy.close()
    finally:
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
