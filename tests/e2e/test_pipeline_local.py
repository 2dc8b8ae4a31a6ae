"""The whole pipeline, locally, exactly as ``recontrast pipeline run --local`` runs it.

ingest -> train -> evaluate -> register through ``kfp.local.SubprocessRunner(use_venv=False)``
(the CLI's ``run_local``; every step in its own process), against real servers on loopback:

* the dataset is a small subset of ``tiles_root`` (``../shared/data/magnetic-tile-dev``, or
  its synthetic stand-in where that is absent: 8 normal training images, 2 normal + 2
  cracked test images with masks), DVC-tracked in a tmp git
  repository whose default remote is a moto S3 server; it is pushed, then the DVC cache
  and the workspace copy are deleted, so ingest (by repo + revision) pulls from S3;
* MLflow is a real ``mlflow server`` (SQLite backend) whose artifact store is the same
  moto S3 (``mlflow_server``);
* training is tiny (64 px, 2 iterations, batch 4, one block per decoder stage, one
  bottleneck block), set through ``--params`` (a params.yaml); they travel in the
  pipeline's one ``settings`` parameter.

The repository has two tagged revisions of the dataset: ``good`` and ``bad`` (the same
plus a truncated image, named ``.jpg``, in ``train/good``). The first test runs ``good`` and checks MLflow
(parent + child runs, tags, params, metrics, artifacts on S3), the registry (a first
model over a 0.0 floor becomes ``champion``), the pyfunc model loaded back from
``models:/<name>@champion`` and that no credential value reached MLflow or the logs.
The second runs ``bad``: the pipeline fails at ingest naming the file and nothing is
registered.

Fails (not skips) where the ``dvc`` executable of the pipeline extra is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, require_dev_tool
from tests.integration.conftest import ARTIFACT_BUCKET
from tests.integration.test_ingest import (
    DVC,
    GIT_ENV,
    N_TEST_CRACK,
    N_TEST_GOOD,
    N_TRAIN,
    copy_subset,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# Unique credential values: the pipeline's processes get them (moto accepts any), and
# they must appear nowhere in MLflow, the registry or the logs.
SECRET_ACCESS_KEY = f"e2e-secret-{uuid.uuid4().hex}"
ACCESS_KEY_ID = f"E2EKEYID{uuid.uuid4().hex[:12].upper()}"
DVC_BUCKET = "e2e-dvc-store"
DATA_PATH = "data/tiles"
BAD_FILE = "zz_truncated.jpg"
STEPS = ("ingest", "train", "evaluate", "register")
TINY_TRAIN = {
    "image_size": 64,
    "iterations": 2,
    "batch_size": 4,
    "decoder_blocks": [1, 1, 1],
    "bottleneck_blocks": 1,
    "device": "cpu",
    "checkpoint_every": 2,
    "log_every": 1,
}


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def pipeline_env(moto_s3, mlflow_server) -> dict:
    """The environment of the pipeline's processes: S3 endpoint (moto) with unique
    credentials, MLflow on the loopback server."""
    env = {**os.environ, **moto_s3.env(), **GIT_ENV}
    env.update({
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("RECONTRAST_PIPELINE_RUN_ID", None)
    return env


@pytest.fixture(scope="module")
def data_repo(moto_s3, pipeline_env, tiles_root, tmp_path_factory) -> dict:
    """git + DVC repository: ``data/tiles`` at tags ``good`` and ``bad``, pushed to the
    S3 remote on moto; the DVC cache and the workspace data are deleted."""
    dvc = require_dev_tool(DVC, "dvc (the pipeline extra)")
    s3 = moto_s3.client()
    try:
        s3.create_bucket(Bucket=DVC_BUCKET)
    except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        pass
    env = pipeline_env
    repo = tmp_path_factory.mktemp("e2e") / "datarepo"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    _run([dvc, "config", "core.analytics", "false"], repo, env)
    _run([dvc, "remote", "add", "-d", "storage", f"s3://{DVC_BUCKET}/datarepo"], repo, env)
    _run([dvc, "remote", "modify", "storage", "endpointurl", moto_s3.endpoint_url], repo, env)

    tiles = repo / DATA_PATH
    copy_subset(tiles_root, tiles, n_train=N_TRAIN)
    _run([dvc, "add", DATA_PATH], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "data: good"], repo, env)
    _run(["git", "tag", "good"], repo, env)
    good_commit = _run(["git", "rev-parse", "HEAD"], repo, env)

    # A truncated image: the first half of a training image (JPEG real, PNG synthetic).
    first = sorted((tiles / "train" / "good").iterdir())[0].read_bytes()
    (tiles / "train" / "good" / BAD_FILE).write_bytes(first[: len(first) // 2])
    _run([dvc, "add", DATA_PATH], repo, env)
    _run(["git", "commit", "-q", "-am", "data: bad"], repo, env)
    _run(["git", "tag", "bad"], repo, env)

    _run([dvc, "push", "-q", "--all-commits"], repo, env)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(tiles)
    assert s3.list_objects_v2(Bucket=DVC_BUCKET, Prefix="datarepo/").get("KeyCount", 0) > 0
    return {"repo": repo, "good_commit": good_commit}


def write_params(path: Path, repo: Path, rev: str, model_name: str, experiment: str, tracking_uri: str) -> Path:
    """A params.yaml (PipelineConfig) for a tiny run of ``DATA_PATH`` at ``rev``."""
    params = {
        "data": {"source": DATA_PATH, "dvc_repo": str(repo), "dvc_rev": rev},
        "train": TINY_TRAIN,
        # a first model becomes champion whatever its (2-iteration) accuracy
        "registry": {"model_name": model_name, "floors": {"image_auroc": 0.0}, "baseline_floor": False},
        "tracking": {"tracking_uri": tracking_uri, "experiment": experiment},
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_pipeline(params: Path, pipeline_root: Path, run_id: str, env: dict) -> subprocess.CompletedProcess:
    """``recontrast pipeline run --local --params ... --json``, from the repository root
    (so the runs carry its git commit)."""
    cmd = [sys.executable, "-m", "recontrast_core.cli", "pipeline", "run", "--local",
           "--params", str(params), "--pipeline-root", str(pipeline_root),
           "--pipeline-run-id", run_id, "--json"]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=840)


def git_head() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def pipeline_runs(client, experiment: str, run_id: str) -> tuple:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], f"tags.pipeline_run_id = '{run_id}'")
    parents = [r for r in runs if r.data.tags.get("recontrast.role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("recontrast.role") == "step"]
    return runs, parents, children


def text_files(root: Path, max_bytes: int = 2_000_000) -> dict[str, str]:
    out = {}
    for f in root.rglob("*"):
        if f.is_file() and f.stat().st_size <= max_bytes:
            out[str(f)] = f.read_bytes().decode("utf-8", errors="replace")
    return out


# ---------------------------------------------------------------------------------------
def test_pipeline_local_dvc_s3_mlflow_registry(data_repo, pipeline_env, mlflow_server, moto_s3, tiles_root, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    tag = uuid.uuid4().hex[:8]
    model_name, experiment, run_id = f"e2e-tiles-{tag}", f"e2e-{tag}", f"e2e-good-{tag}"
    params = write_params(tmp_path / "params.yaml", data_repo["repo"], "good", model_name, experiment,
                          mlflow_server.url)
    root = tmp_path / "kfp-local"

    t0 = time.perf_counter()
    proc = run_pipeline(params, root, run_id, pipeline_env)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"pipeline failed ({wall:.0f}s):\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout)
    print(f"pipeline wall time: {wall:.1f}s")

    # -- the register step's decision: a first model over a 0.0 floor is the champion
    assert result["pipeline_run_id"] == run_id and result["model_name"] == model_name
    assert result["version"] == "1"
    assert result["decision"] == "promoted" and result["promoted"] is True
    assert result["champion"] == "1" and result["challenger"] is None
    assert Path(result["log"]).is_file()

    client = MlflowClient(mlflow_server.url)

    # -- MLflow: one parent run, one child run per step, all carrying the provenance tags
    runs, parents, children = pipeline_runs(client, experiment, run_id)
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    by_step = {r.data.tags["step"]: r for r in children}
    assert sorted(by_step) == sorted(STEPS) and len(children) == len(STEPS)
    fingerprint = parent.data.tags["dataset_fingerprint"]
    assert len(fingerprint) >= 16
    head = git_head()
    for run in [parent, *children]:
        tags = run.data.tags
        assert tags["pipeline_run_id"] == run_id
        assert tags["dvc_rev"] == data_repo["good_commit"], (run.info.run_name, tags)
        assert tags["dataset_fingerprint"] == fingerprint, (run.info.run_name, tags)
        if head:
            assert tags["git_commit"] == head, (run.info.run_name, tags)
    for run in children:
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id

    # ingest: the dataset as a run input with its DVC revision, counts as metrics
    ingest = by_step["ingest"]
    n_images = N_TRAIN + N_TEST_GOOD + N_TEST_CRACK
    assert ingest.data.metrics["data/n_images"] == n_images
    assert ingest.data.metrics["data/train_normal"] == N_TRAIN
    inputs = ingest.inputs.dataset_inputs
    assert len(inputs) == 1 and fingerprint.startswith(inputs[0].dataset.digest)
    assert {t.key: t.value for t in inputs[0].tags}["dvc_rev"] == data_repo["good_commit"]
    assert ingest.data.params["source_kind"] == "dvc"

    # train: the tiny settings arrived (through the settings parameter)
    train_params = by_step["train"].data.params
    expected = {"train.image_size": "64", "train.iterations": "2", "train.batch_size": "4",
                "train.decoder_blocks": "[1, 1, 1]", "train.bottleneck_blocks": "1",
                "train.device": "cpu", "n_train_images": str(N_TRAIN)}
    assert {k: train_params.get(k) for k in expected} == expected
    assert len(client.get_metric_history(by_step["train"].info.run_id, "train/loss")) >= 1
    assert by_step["train"].data.metrics["train/iterations"] == 2
    # model.kind auto (the default): every candidate's validation metrics and the chosen kind
    train_run = by_step["train"].data
    chosen = train_run.tags["model_kind"]
    assert chosen in ("recontrast", "patchknn", "fused")
    for kind in ("recontrast", "patchknn", "fused"):
        assert 0.0 <= train_run.metrics[f"selection/{kind}/image_auroc"] <= 1.0, sorted(train_run.metrics)
    assert any(k.startswith("selection/grid/") for k in train_run.metrics)

    # evaluate: the metrics and the evaluation artifacts (stored on S3 through the server)
    eval_run = by_step["evaluate"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "baseline_image_auroc", "baseline_pixel_auroc"):
        assert key in eval_run.data.metrics, sorted(eval_run.data.metrics)  # the baseline beside the model
    assert 0.0 <= eval_run.data.metrics["image_auroc"] <= 1.0
    eval_files = {Path(a.path).name for a in client.list_artifacts(eval_run.info.run_id, "evaluation")}
    assert "metrics.json" in eval_files, eval_files
    plot_files = {Path(a.path).name for a in client.list_artifacts(eval_run.info.run_id, "evaluation/plots")}
    assert {"roc.png", "pr.png", "overlay_grid.png"} <= plot_files, plot_files
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=ARTIFACT_BUCKET).get("Contents", [])]
    assert any(eval_run.info.run_id in k and k.endswith("metrics.json") for k in keys), keys[:20]

    # register: the decision on the run
    reg_run = by_step["register"]
    assert reg_run.data.tags["registered_version"] == "1"
    assert reg_run.data.tags["promotion_decision"] == "promoted"

    # -- the registry: one version, champion, tagged with the run and the data
    # the search index can lag the write on a loaded machine (seen once in a full run): poll
    deadline = time.monotonic() + 30
    versions = client.search_model_versions(f"name = '{model_name}'")
    while not versions and time.monotonic() < deadline:
        time.sleep(1)
        versions = client.search_model_versions(f"name = '{model_name}'")
    assert [v.version for v in versions] == ["1"], client.get_model_version(model_name, "1")
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.version == "1"
    assert champion.tags["pipeline_run_id"] == run_id
    assert champion.tags["dataset_fingerprint"] == fingerprint
    assert champion.tags["promotion_decision"] == "promoted"
    assert champion.tags["model_kind"] == chosen  # the registry version records the kind
    from recontrast_core.mlops import registry

    # the evaluation is the metrics of the version's logged model, not tags
    assert registry.version_metrics(client, champion)["image_auroc"] == pytest.approx(eval_run.data.metrics["image_auroc"])
    assert "metric.image_auroc" not in champion.tags
    assert set(client.get_registered_model(model_name).aliases) == {"champion"}

    # -- the pyfunc model from the registry scores an image path
    img = sorted((tiles_root / "test" / "crack").iterdir())[0]
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    os.environ["RECONTRAST_ALLOWED_PATH_ROOT"] = str(tiles_root)  # `path` input is off unless a root is allowed
    try:
        model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
        out = model.predict(pd.DataFrame({"path": [str(img)]}))
    finally:
        os.environ.pop("RECONTRAST_ALLOWED_PATH_ROOT", None)
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert list(out.columns) == ["score", "normalized_score", "decision"]
    assert len(out) == 1
    row = out.iloc[0]
    assert pd.notna(row["score"]) and 0.0 <= row["normalized_score"] <= 1.0
    assert bool(row["decision"]) == (row["normalized_score"] >= 0.5)

    # -- no credential value anywhere: params, tags, version tags, logs, the tracking DB
    blobs = {
        "params+tags": json.dumps([[r.data.params, r.data.tags] for r in runs]),
        "version tags": json.dumps([v.tags for v in client.search_model_versions(f"name = '{model_name}'")]),
        "cli stdout": proc.stdout,
        "cli stderr": proc.stderr,
        "mlflow server log": mlflow_server.log_tail(10**8),
        **text_files(root),  # the runner log and every step's outputs
    }
    db = Path(mlflow_server.backend_uri[len("sqlite:///"):])
    blobs["tracking db"] = db.read_bytes().decode("utf-8", errors="replace")
    for secret in (SECRET_ACCESS_KEY, ACCESS_KEY_ID):
        leaks = [name for name, text in blobs.items() if secret in text]
        assert not leaks, f"credential value found in {leaks}"


def test_bad_dataset_fails_at_ingest_and_registers_nothing(data_repo, pipeline_env, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    tag = uuid.uuid4().hex[:8]
    model_name, experiment, run_id = f"e2e-bad-{tag}", f"e2e-bad-{tag}", f"e2e-bad-{tag}"
    params = write_params(tmp_path / "params.yaml", data_repo["repo"], "bad", model_name, experiment,
                          mlflow_server.url)
    root = tmp_path / "kfp-local"

    t0 = time.perf_counter()
    proc = run_pipeline(params, root, run_id, pipeline_env)
    wall = time.perf_counter() - t0
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-4000:])
    assert proc.stdout == ""  # --json: no result, and nothing else on stdout
    # one error line: the failed step and the validation error naming the file
    error = " ".join(proc.stderr.split("error:")[-1].split())  # rich may wrap the line
    assert "local pipeline run failed" in error and "ingest-op" in error, proc.stderr[-4000:]
    assert f"train/good/{BAD_FILE}" in error and "truncated" in error, error
    print(f"failed in {wall:.1f}s: error: {error}")
    log = (root / f"{run_id}.log").read_text()
    assert f"train/good/{BAD_FILE}" in log
    # the pipeline stopped at ingest, without the cluster's retries (30 s backoff and up)
    assert log.count("Executing task 'ingest-op'") == 1
    assert "Executing task 'train-op" not in log and "Executing task 'register-op" not in log
    assert wall < 120, f"a failed local run took {wall:.0f}s"

    # nothing registered
    client = MlflowClient(mlflow_server.url)
    assert client.search_registered_models(f"name = '{model_name}'") == []
    assert client.search_model_versions(f"name = '{model_name}'") == []
    # the runs say what happened: parent and ingest FAILED, no other step started
    runs, parents, children = pipeline_runs(client, experiment, run_id)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert [r.data.tags["step"] for r in children] == ["ingest"]
    assert children[0].info.status == "FAILED"
