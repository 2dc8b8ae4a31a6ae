"""Batch scoring (``recontrast predict`` with s3:// inputs/outputs or a registry model)
against real servers on loopback: a moto S3 server and ``mlflow server`` (conftest.py), real
magnetic-tile images (``tiles_root``: ../shared/data/magnetic-tile-dev, or its synthetic
stand-in where that is absent) and a tiny real bundle (64 px, 2 iterations, one block per
decoder stage, CPU).

The restart test kills the CLI with SIGKILL once some parts are committed, runs it again
and checks the final table: every image exactly once, the corrupt file as an error row,
an overlay for every scored image, and the killed run's parts reused, not rescored.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "recontrast_core.cli"]
N_IMAGES = 20
CHUNK = 3


def _images(root: Path, n: int) -> list[Path]:
    """``n`` test images of ``root``, spread over the defect folders."""
    folders = sorted(p for p in (root / "test").iterdir() if p.is_dir())
    per = -(-n // len(folders))
    return [f for d in folders for f in sorted(d.iterdir())[:per]][:n]


@pytest.fixture(scope="module")
def tiny_bundle(tiles_root, tmp_path_factory) -> Path:
    from recontrast_core.config import TrainConfig
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.train import train_model

    root = tmp_path_factory.mktemp("batch-train")
    data = root / "tiles"
    for rel, n in (("train/good", 8), ("test/good", 2), ("test/crack", 2)):
        for f in sorted((tiles_root / rel).iterdir())[:n]:
            (data / rel).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, data / rel / f.name)
            if rel == "test/crack":
                (data / "ground_truth/crack").mkdir(parents=True, exist_ok=True)
                shutil.copy(tiles_root / "ground_truth/crack" / f"{f.stem}_mask.png", data / "ground_truth/crack")
    cfg = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                      device="cpu", log_every=1, checkpoint_every=2)
    return train_model(read_mvtec(data), cfg, root / "run", progress=False).bundle_dir


def _env(moto_s3, **extra) -> dict:
    return {**os.environ, **moto_s3.env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _table(s3, bucket: str, key: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


@pytest.fixture
def bucket_with_images(moto_s3, tiles_root) -> tuple[str, list[str]]:
    """A fresh bucket: 20 test images and a corrupt PNG under incoming/ (and a non-image,
    which is not scored); returns the bucket and the URIs that must be scored."""
    s3, bucket = moto_s3.client(), f"batch-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    expected = []
    for f in _images(tiles_root, N_IMAGES):
        key = f"incoming/{f.parent.name}/{f.name}"
        s3.upload_file(str(f), bucket, key)
        expected.append(f"s3://{bucket}/{key}")
    s3.put_object(Bucket=bucket, Key="incoming/zz_corrupt.png", Body=b"\x89PNG\r\n\x1a\n truncated")
    s3.put_object(Bucket=bucket, Key="incoming/README.txt", Body=b"not an image")
    return bucket, expected + [f"s3://{bucket}/incoming/zz_corrupt.png"]


def test_killed_run_restarts_from_its_parts(tiny_bundle, moto_s3, bucket_with_images) -> None:
    bucket, expected = bucket_with_images
    s3 = moto_s3.client()
    args = [*CLI, "predict", "--model", str(tiny_bundle), f"s3://{bucket}/incoming/", "--out",
            f"s3://{bucket}/results/", "--chunk-size", str(CHUNK), "--no-progress", "--json"]
    # 1.5 s after each committed part (fault-injection hook) so the kill lands mid-run
    proc = subprocess.Popen(args, env=_env(moto_s3, RECONTRAST_FAILPOINT_PART_SLEEP="1.5"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if len(_keys(s3, bucket, "results/parts/")) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it was killed: {proc.communicate()[1][-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    killed_parts = _keys(s3, bucket, "results/parts/")
    rows_before = sum(_table(s3, bucket, k).num_rows for k in killed_parts)
    total = len(expected)
    assert 2 <= len(killed_parts) < -(-total // CHUNK) and 0 < rows_before < total
    assert not _keys(s3, bucket, "results/results.")  # no final table from the killed run

    t0 = time.perf_counter()
    r = subprocess.run(args, env=_env(moto_s3), capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr  # finished; one image unreadable
    summary = json.loads(r.stdout)
    assert summary["reused"] == rows_before and summary["scored"] == total - rows_before < total
    assert summary["images"] == total and summary["unreadable"] == 1
    assert "zz_corrupt.png" in r.stderr and "Traceback" not in r.stderr

    table = _table(s3, bucket, "results/results.parquet").to_pylist()
    paths = [row["path"] for row in table]
    assert sorted(paths) == sorted(expected) and len(set(paths)) == len(paths)  # each image exactly once
    bad = [row for row in table if row["error"]]
    assert [row["path"] for row in bad] == [f"s3://{bucket}/incoming/zz_corrupt.png"]
    assert bad[0]["score"] is None and bad[0]["decision"] is None and "/tmp" not in bad[0]["error"]
    overlays = set(_keys(s3, bucket, "results/overlays/"))
    for row in table:
        assert row["model_version"].startswith("bundle:") and row["scored_at"] is not None
        if not row["error"]:
            assert row["score"] is not None and isinstance(row["decision"], bool)
            key = row["overlay"][len(f"s3://{bucket}/"):]
            assert key in overlays
    png = s3.get_object(Bucket=bucket, Key=sorted(overlays)[0])["Body"].read()
    assert png.startswith(b"\x89PNG")

    import csv

    csv_rows = list(csv.DictReader(io.StringIO(
        s3.get_object(Bucket=bucket, Key="results/results.csv")["Body"].read().decode())))
    assert [row["path"] for row in csv_rows] == paths
    assert list(csv_rows[0]) == ["path", "score", "normalized_score", "decision", "error", "overlay", "model_uri",
                                 "model_version", "scored_at"]
    all_parts = _keys(s3, bucket, "results/parts/")
    assert set(killed_parts) <= set(all_parts) and sum(_table(s3, bucket, k).num_rows for k in all_parts) == total
    print(f"restart: {rows_before} reused, {summary['scored']} scored in {time.perf_counter() - t0:.1f}s")


def _register_champion(tiny_bundle: Path, name: str) -> tuple[str, str]:
    """``name``: a new registered model whose champion is the tiny bundle; (version, run id)."""
    from recontrast_core.mlops import registry, tracking

    client = tracking.get_client()
    exp = client.get_experiment_by_name("batch-tests") or client.get_experiment(client.create_experiment("batch-tests"))
    run = client.create_run(exp.experiment_id)
    tracking.log_bundle(tiny_bundle, run.info.run_id, "bundle", client=client)
    version = registry.register_candidate(run.info.run_id, name, f"pr-{uuid.uuid4().hex[:8]}", {"image_auroc": 0.9},
                                          "f" * 64, artifact_path="bundle", client=client)
    registry.force_promote(name, version, "batch-scoring test", client=client)
    return version, run.info.run_id


def test_registry_champion_and_run_uris(tiny_bundle, mlflow_tracking, moto_s3, tiles_root, tmp_path) -> None:
    """``--model models:/NAME@champion`` (CLI, real mlflow server) and ``runs:/`` (library)."""
    name = f"batch-{uuid.uuid4().hex[:6]}"
    version, run_id = _register_champion(tiny_bundle, name)
    folder = tmp_path / "images"
    folder.mkdir()
    for f in _images(tiles_root, 3):
        shutil.copy(f, folder / f.name)
    s3, bucket = moto_s3.client(), f"reg-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    r = subprocess.run([*CLI, "predict", "--model", f"models:/{name}@champion", folder, "--out",
                        f"s3://{bucket}/scores/", "--no-progress", "--json"],
                       env=_env(moto_s3, MLFLOW_TRACKING_URI=mlflow_tracking.url), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_version"] == f"{name}/{version}"
    table = _table(s3, bucket, "scores/results.parquet").to_pylist()
    assert len(table) == 3 and {row["model_uri"] for row in table} == {f"models:/{name}@champion"}
    assert {Path(row["path"]).name for row in table} == {f.name for f in folder.iterdir()}

    from recontrast_core.mlops.batch_scoring import run_batch_scoring

    out = tmp_path / "by-run"
    summary = run_batch_scoring(f"runs:/{run_id}/bundle", [folder], out, progress=False, overlays=False)
    assert summary["model_version"] == f"run:{run_id}/bundle" and summary["scored"] == 3
    assert (out / "results.csv").is_file() and (out / "results.parquet").is_file() and not (out / "overlays").exists()
    # the same output with another model: refused, nothing written
    from recontrast_core.errors import UserError

    with pytest.raises(UserError, match="holds results of model run:"):
        run_batch_scoring(str(tiny_bundle), [folder], out, progress=False)


@pytest.mark.parametrize("case", ["unknown input bucket", "unknown output bucket", "missing model", "no alias",
                                  "bad model URI", "bad input URI"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tiny_bundle, mlflow_tracking, moto_s3,
                                                           tiles_root, monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from recontrast_core.cli.app import app

    for key, value in moto_s3.env().items():
        monkeypatch.setenv(key, value)
    s3, bucket = moto_s3.client(), f"bad-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(_images(tiles_root, 1)[0]), bucket, "in/a.jpg")
    good_in, good_out, model = f"s3://{bucket}/in/", f"s3://{bucket}/out/", str(tiny_bundle)
    name = f"{case.split()[0]}-{uuid.uuid4().hex[:6]}"
    if case == "no alias":  # registered, but no version is the champion
        from recontrast_core.mlops import tracking

        tracking.get_client().create_registered_model(name)
    args, named = {
        "unknown input bucket": ([model, "s3://no-such-bucket/in/", good_out], "s3://no-such-bucket/in/"),
        "unknown output bucket": ([model, good_in, "s3://no-such-bucket/out/"], "s3://no-such-bucket/out/"),
        "missing model": ([f"models:/{name}@champion", good_in, good_out], f"models:/{name}@champion"),
        "no alias": ([f"models:/{name}@champion", good_in, good_out], "no version with the alias 'champion'"),
        "bad model URI": (["ftp://host/bundle", good_in, good_out], "ftp://host/bundle"),
        "bad input URI": ([model, "gs://bucket/in/", good_out], "gs://bucket/in/"),
    }[case]
    res = CliRunner().invoke(app, ["predict", "--model", args[0], args[1], "--out", args[2], "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], res.stderr
    assert not _keys(s3, bucket, "out/")


def test_local_kfp_run_of_the_batch_pipeline(tiny_bundle, tiles_root, tmp_path) -> None:
    """The compiled component, run by KFP's local runner, scores a folder into a folder."""
    from recontrast_core.pipelines.batch_scoring import pipeline_arguments
    from recontrast_core.pipelines.local_runner import run_local_batch_scoring

    folder = tmp_path / "images"
    folder.mkdir()
    for f in _images(tiles_root, 2):
        shutil.copy(f, folder / f.name)
    (folder / "broken.png").write_bytes(b"")
    args = pipeline_arguments(str(folder), str(tmp_path / "scores"), str(tiny_bundle), chunk_size=2,
                              device="cpu", run_subfolder=False)
    result = run_local_batch_scoring(args, tmp_path / "kfp")
    assert result["images"] == 3 and result["scored"] == 3 and result["unreadable"] == 1
    assert (tmp_path / "scores" / "results.parquet").is_file()
    assert len(list((tmp_path / "scores" / "parts").glob("part-*.parquet"))) == 2


def test_a_fused_bundle_batch_scores_like_its_detector(tiny_bundle, moto_s3, bucket_with_images, tiles_root) -> None:
    """Batch scoring is kind-agnostic: a fused bundle (ReContrast at 64 px inside a 96 px
    patch-kNN graph) scores S3 -> S3 exactly as its own Detector does on the same files."""
    import torch

    from recontrast_core.bundle import load_detector
    from recontrast_core.config import ModelConfig
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.fit import fuse_existing

    data = tiny_bundle.parents[1] / "tiles"
    fused = fuse_existing(tiny_bundle, read_mvtec(data), ModelConfig(patchknn={"image_size": 96, "fraction": 0.25}),
                          tiny_bundle.parents[1] / "fused", device="cpu")
    bucket, expected = bucket_with_images
    s3 = moto_s3.client()
    r = subprocess.run([*CLI, "predict", "--model", str(fused), f"s3://{bucket}/incoming/", "--out",
                        f"s3://{bucket}/fused-results/", "--no-overlays", "--no-progress", "--json"],
                       env=_env(moto_s3, OMP_NUM_THREADS=str(torch.get_num_threads())),  # as the reference
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr  # the corrupt PNG
    table = {row["path"]: row for row in _table(s3, bucket, "fused-results/results.parquet").to_pylist()}
    assert sorted(table) == sorted(expected)
    det = load_detector(fused, "cpu")
    assert det.kind == "fused"
    local = {f"s3://{bucket}/incoming/{f.parent.name}/{f.name}": f for f in _images(tiles_root, N_IMAGES)}
    ref = dict(zip(local, det.predict(list(local.values()))))
    for uri, row in ref.items():
        assert table[uri]["score"] == pytest.approx(row["score"], rel=1e-6, abs=1e-7)
        assert table[uri]["decision"] == row["decision"]
