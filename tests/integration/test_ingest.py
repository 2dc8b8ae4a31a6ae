"""The ingest step from every kind of source, against real servers on loopback.

* a local folder;
* an ``s3://`` prefix on a moto S3 server (``moto_s3`` from conftest.py);
* a real DVC repository: ``git init`` + ``dvc init`` in tmp_path, ``dvc add`` of a small
  image folder, two revisions, ``dvc push`` to a local-directory remote and to an S3 remote
  on moto; the cache and the workspace copy are deleted, then ingest reads each revision
  through ``DVCFileSystem`` (from the remote);
* a bad dataset fails at ingest with the validation error naming the file.

Data: a small subset (8 normal training images, 2 normal + 2 cracked test images with
their masks) of ``tiles_root``: ``../shared/data/magnetic-tile-dev``, or its synthetic
stand-in (tests/synthetic_tiles.py) where that is absent. The DVC tests fail (not skip)
where the ``dvc`` executable of the pipeline extra is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recontrast_core import steps
from recontrast_core.steps import artifacts
from recontrast_core.steps.settings import apply_overrides
from recontrast_core.data.manifest import Manifest
from recontrast_core.errors import DataValidationError, UserError
from tests.conftest import require_dev_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

N_TRAIN, N_TEST_GOOD, N_TEST_CRACK = 8, 2, 2
DVC = Path(sys.executable).with_name("dvc")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "recontrast-test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "recontrast-test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def copy_subset(src: Path, dst: Path, n_train: int = N_TRAIN) -> Path:
    """A small MVTec-layout copy of ``src`` (the dev dataset or its synthetic stand-in;
    sorted, so deterministic)."""
    def take(folder: str, n: int) -> list[Path]:
        files = sorted(p for p in (src / folder).iterdir() if not p.name.startswith("."))[:n]
        for f in files:
            (dst / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / folder / f.name)
        return files

    take("train/good", n_train)
    take("test/good", N_TEST_GOOD)
    for f in take("test/crack", N_TEST_CRACK):
        mask = src / "ground_truth" / "crack" / f"{f.stem}_mask.png"
        (dst / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
        shutil.copy2(mask, dst / "ground_truth" / "crack" / mask.name)
    return dst


@pytest.fixture
def subset(tiles_root: Path, tmp_path: Path) -> Path:
    return copy_subset(tiles_root, tmp_path / "tiles")


def _info(out: Path) -> dict:
    return json.loads((out / artifacts.INGEST_FILE).read_text())


def ingest(source, out: Path, *, dvc_remote=None, pipeline_run_id=None, tracking_uri=None, experiment=None, **data):
    """steps.ingest with ``data.*`` settings given as keywords (source, copy_local, dvc_repo...)."""
    overrides = {"data.source": str(source), **{f"data.{k}": v for k, v in data.items()},
                 "tracking.tracking_uri": tracking_uri, "tracking.experiment": experiment}
    return steps.ingest(out, apply_overrides(None, overrides), dvc_remote=dvc_remote, pipeline_run_id=pipeline_run_id)


# ---------------------------------------------------------------------------------------
# local folder
# ---------------------------------------------------------------------------------------
def test_ingest_local_folder(subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingest"
    mpath = ingest(subset, out)
    assert mpath == out / "manifest.json"
    m = Manifest.load(mpath)
    assert len(m) == N_TRAIN + N_TEST_GOOD + N_TEST_CRACK
    assert all(e.sha256 and len(e.sha256) == 64 for e in m.entries)
    assert m.fingerprint and m.fingerprint == m.compute_fingerprint()
    info = _info(out)
    assert info["source_kind"] == "local" and info["data_dir"] is None
    assert info["counts"] == {"n_images": 12, "train_normal": 8, "train_anomalous": 0,
                              "test_normal": 2, "test_anomalous": 2, "masks": 2}
    assert info["fingerprint"] == m.fingerprint
    # Same content -> same fingerprint, wherever the folder lies; changed content -> new one.
    moved = shutil.copytree(subset, tmp_path / "elsewhere")
    assert Manifest.load(ingest(moved, tmp_path / "i2")).fingerprint == m.fingerprint
    (moved / "train" / "good" / sorted(os.listdir(moved / "train" / "good"))[0]).unlink()
    assert Manifest.load(ingest(moved, tmp_path / "i3")).fingerprint != m.fingerprint


def test_ingest_copy_local_travels_with_the_artifact(subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "a" / "ingest"
    ingest(subset, out, copy_local=True)
    assert _info(out)["data_dir"] == "data"
    moved = tmp_path / "b" / "ingest"
    shutil.move(str(out), moved)  # e.g. a KFP artifact downloaded in another pod
    m = artifacts.load_manifest(moved)
    assert Path(m.root) == (moved / "data").resolve()
    assert all(p.is_file() for p in m.image_paths())


# ---------------------------------------------------------------------------------------
# bad dataset
# ---------------------------------------------------------------------------------------
def test_bad_dataset_fails_at_ingest_naming_the_file(subset: Path, tmp_path: Path) -> None:
    bad = subset / "train" / "good" / "zz_truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    out = tmp_path / "ingest"
    with pytest.raises(DataValidationError) as err:
        ingest(subset, out)
    assert "zz_truncated.png" in str(err.value)
    assert not (out / "manifest.json").exists()  # nothing for later steps to pick up


def test_missing_dataset_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        ingest(tmp_path / "nope", tmp_path / "out")


# ---------------------------------------------------------------------------------------
# S3 (moto)
# ---------------------------------------------------------------------------------------
def _upload(s3, folder: Path, bucket: str, prefix: str) -> int:
    client = s3.client()
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    n = 0
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")
            n += 1
    return n


def test_ingest_s3_prefix(moto_s3, subset: Path, tmp_path: Path, monkeypatch) -> None:
    for key, value in moto_s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # endpoint from the argument first
    n = _upload(moto_s3, subset, "datasets", "tiles/v1")
    out = tmp_path / "ingest"
    mpath = ingest("s3://datasets/tiles/v1", out, s3_endpoint_url=moto_s3.endpoint_url)
    info = _info(out)
    assert info["source_kind"] == "s3" and info["data_dir"] == "data"
    assert info["fetch"]["objects"] == n and info["fetch"]["downloaded"] == n
    local = Manifest.load(ingest(subset, tmp_path / "local"))
    assert Manifest.load(mpath).fingerprint == local.fingerprint

    # Again, endpoint from the environment this time: unchanged objects are not downloaded.
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)
    ingest("s3://datasets/tiles/v1/", out)
    assert _info(out)["fetch"] == {"objects": n, "downloaded": 0, "bytes": 0}


def test_ingest_s3_errors_are_user_errors(moto_s3, tmp_path: Path, monkeypatch) -> None:
    for key, value in moto_s3.env().items():
        monkeypatch.setenv(key, value)
    moto_s3.client().create_bucket(Bucket="empty-bucket")
    with pytest.raises(UserError, match="no objects"):
        ingest("s3://empty-bucket/nothing", tmp_path / "a")
    with pytest.raises(UserError, match="NoSuchBucket"):
        ingest("s3://no-such-bucket-here/x", tmp_path / "b")


def test_bad_dataset_from_s3_names_the_file(moto_s3, subset: Path, tmp_path: Path, monkeypatch) -> None:
    for key, value in moto_s3.env().items():
        monkeypatch.setenv(key, value)
    (subset / "test" / "good" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    _upload(moto_s3, subset, "datasets", "tiles/broken")
    with pytest.raises(DataValidationError, match="broken.jpg"):
        ingest("s3://datasets/tiles/broken", tmp_path / "ingest")


# ---------------------------------------------------------------------------------------
# DVC repository with a local and an S3 remote
# ---------------------------------------------------------------------------------------
def _run(cmd: list, cwd: Path, env: dict) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture
def dvc_repo(moto_s3, tiles_root: Path, tmp_path: Path, monkeypatch):
    """A git+DVC repo with data/tiles at two revisions, pushed to both remotes; the DVC
    cache and the workspace data are deleted afterwards."""
    dvc = require_dev_tool(DVC, "dvc (the pipeline extra)")
    for key, value in moto_s3.env().items():
        monkeypatch.setenv(key, value)
    moto_s3.client().create_bucket(Bucket="dvc-store")
    env = {**os.environ, **GIT_ENV}
    repo = tmp_path / "datarepo"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    _run([dvc, "config", "core.analytics", "false"], repo, env)
    local_remote = tmp_path / "dvc-remote"
    _run([dvc, "remote", "add", "-d", "localremote", local_remote], repo, env)
    _run([dvc, "remote", "add", "s3remote", "s3://dvc-store/datarepo"], repo, env)
    _run([dvc, "remote", "modify", "s3remote", "endpointurl", moto_s3.endpoint_url], repo, env)

    copy_subset(tiles_root, repo / "data" / "tiles", n_train=N_TRAIN - 2)
    _run([dvc, "add", "data/tiles"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "data v1"], repo, env)
    _run(["git", "tag", "v1"], repo, env)
    rev1 = _run(["git", "rev-parse", "HEAD"], repo, env)
    shutil.rmtree(repo / "data" / "tiles")
    copy_subset(tiles_root, repo / "data" / "tiles", n_train=N_TRAIN)
    _run([dvc, "add", "data/tiles"], repo, env)
    _run(["git", "commit", "-q", "-am", "data v2"], repo, env)
    rev2 = _run(["git", "rev-parse", "HEAD"], repo, env)
    _run([dvc, "push", "-q", "--all-commits"], repo, env)
    _run([dvc, "push", "-q", "--all-commits", "-r", "s3remote"], repo, env)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "tiles")
    return {"repo": repo, "rev1": rev1, "rev2": rev2, "local_remote": local_remote}


def test_ingest_dvc_revisions_from_local_remote(dvc_repo, tmp_path: Path) -> None:
    repo = dvc_repo["repo"]
    out1 = tmp_path / "v1"
    m1 = Manifest.load(ingest("data/tiles", out1, dvc_repo=str(repo), dvc_rev="v1"))
    info1 = _info(out1)
    assert info1["source_kind"] == "dvc" and info1["dvc_rev"] == "v1"
    assert info1["dvc_commit"] == dvc_repo["rev1"]
    assert info1["counts"]["train_normal"] == N_TRAIN - 2
    assert dvc_repo["rev1"] in info1["source"]

    out2 = tmp_path / "v2"
    m2 = Manifest.load(ingest("data/tiles", out2, dvc_repo=str(repo), dvc_rev=dvc_repo["rev2"]))
    assert _info(out2)["counts"]["train_normal"] == N_TRAIN
    assert _info(out2)["dvc_commit"] == dvc_repo["rev2"]
    assert m1.fingerprint != m2.fingerprint
    assert all(p.is_file() for p in artifacts.load_manifest(out2).image_paths())


def test_ingest_dvc_from_s3_remote_logs_to_mlflow(dvc_repo, mlflow_tracking, tmp_path: Path) -> None:
    import mlflow

    shutil.rmtree(dvc_repo["local_remote"])  # only the S3 remote can serve the data now
    cache = dvc_repo["repo"] / ".dvc" / "cache"
    if cache.exists():
        shutil.rmtree(cache)
    out = tmp_path / "v2"
    pipeline_run_id = "test-ingest-dvc-s3"
    mpath = ingest("data/tiles", out, dvc_repo=str(dvc_repo["repo"]), dvc_rev="main",
                         dvc_remote="s3remote", pipeline_run_id=pipeline_run_id,
                         tracking_uri=mlflow_tracking.url, experiment="test-ingest")
    info = _info(out)
    assert info["dvc_commit"] == dvc_repo["rev2"]
    fingerprint = Manifest.load(mpath).fingerprint

    client = mlflow.MlflowClient(mlflow_tracking.url)
    exp = client.get_experiment_by_name("test-ingest")
    runs = client.search_runs([exp.experiment_id], f"tags.pipeline_run_id = '{pipeline_run_id}'")
    parent = [r for r in runs if r.data.tags.get("recontrast.role") == "pipeline"]
    child = [r for r in runs if r.data.tags.get("step") == "ingest"]
    assert len(parent) == 1 and len(child) == 1
    assert parent[0].data.tags["dvc_rev"] == dvc_repo["rev2"]
    assert parent[0].data.tags["dataset_fingerprint"] == fingerprint
    assert child[0].info.status == "FINISHED"
    inputs = child[0].inputs.dataset_inputs
    assert len(inputs) == 1 and fingerprint.startswith(inputs[0].dataset.digest)
    assert {t.key: t.value for t in inputs[0].tags}["dvc_rev"] == dvc_repo["rev2"]
    assert child[0].data.metrics["data/n_images"] == N_TRAIN + N_TEST_GOOD + N_TEST_CRACK
    # no credential reached MLflow
    blob = json.dumps([r.data.params for r in runs] + [r.data.tags for r in runs])
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in blob


def test_ingest_dvc_unknown_revision_is_a_user_error(dvc_repo, tmp_path: Path) -> None:
    with pytest.raises(UserError):
        ingest("data/tiles", tmp_path / "x", dvc_repo=str(dvc_repo["repo"]), dvc_rev="no-such-tag")
    with pytest.raises(UserError, match="not found"):
        ingest("data/nothing", tmp_path / "y", dvc_repo=str(dvc_repo["repo"]), dvc_rev="v1")
