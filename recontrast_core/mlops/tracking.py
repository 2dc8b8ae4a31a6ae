"""MLflow adapter: one parent run per pipeline run, one child run per step.

Where runs go
-------------
* ``MLFLOW_TRACKING_URI`` set (or ``tracking_uri=`` passed): that server / store.
* Otherwise the **embedded default**: ``sqlite:///<workdir>/mlflow.db`` for runs and the
  model registry, artifacts as files under ``<workdir>/mlartifacts``; ``workdir`` is the
  current directory unless passed. Browse it with
  ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` in that directory.
  The usual MLflow variables (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``) apply to S3
  artifact stores as always.

Runs of one pipeline
--------------------
Every pipeline run has an id (``pipeline_run_id``; KFP's run id or a uuid for local
runs). Steps may live in separate processes (KFP pods), so nothing is passed in memory:
:func:`start_pipeline_run` finds-or-creates the parent run by the tag
``pipeline_run_id`` (``mlflow.search_runs``), and :func:`step_run` finds-or-creates the
child run by the tags ``pipeline_run_id`` + ``step`` under it. A retried step therefore
reopens its own child run instead of adding a new one.

Parent tags: ``pipeline_run_id``, ``git_commit`` (and ``mlflow.source.git.commit``),
``dvc_rev``, ``dataset_fingerprint``. Params are flattened (``a.b.c``) and pass through
:func:`redact_params`: a credential never reaches MLflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from .redaction import flatten_params, param_str, redact_params, redact_tags, redact_value, secret_env_values

DEFAULT_EXPERIMENT = "recontrast"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"

TAG_PIPELINE_RUN_ID = "pipeline_run_id"
TAG_STEP = "step"
TAG_ROLE = "recontrast.role"  # "pipeline" on parents, "step" on children
TAG_GIT_COMMIT = "git_commit"
TAG_DVC_REV = "dvc_rev"
TAG_FINGERPRINT = "dataset_fingerprint"


# ---------------------------------------------------------------------------------------
# where runs go
# ---------------------------------------------------------------------------------------
def _mlflow():
    import mlflow  # imported lazily: the pure-ML modules never need it

    return mlflow


def embedded_tracking_uri(workdir: Optional[os.PathLike] = None) -> str:
    """``sqlite:///<workdir>/mlflow.db`` (absolute path; workdir defaults to the cwd)."""
    root = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{root / EMBEDDED_DB}"



def resolve_tracking_uri(
    tracking_uri: Optional[str] = None, workdir: Optional[os.PathLike] = None
) -> str:
    """The explicit argument, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite file."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(workdir)



def _sqlite_artifact_location(uri: str) -> Optional[str]:
    """For a SQLite store, artifacts go to ``mlartifacts/`` next to the database file
    (the embedded default: ``<workdir>/mlartifacts``); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    if not db.is_absolute():
        db = Path(os.getcwd()) / db
    return (db.resolve().parent / EMBEDDED_ARTIFACTS).as_uri()


def configure(
    tracking_uri: Optional[str] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    workdir: Optional[os.PathLike] = None,
) -> str:
    """Point MLflow at the resolved store and select (create) ``experiment``.

    With a SQLite store (the embedded default included) a new experiment's artifacts go
    to ``mlartifacts/`` next to the database; with a server, the server decides.
    Returns the experiment id.
    """
    mlflow = _mlflow()
    uri = resolve_tracking_uri(tracking_uri, workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = _sqlite_artifact_location(uri)
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # created concurrently by another step
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def get_client(tracking_uri: Optional[str] = None, workdir: Optional[os.PathLike] = None):
    mlflow = _mlflow()
    uri = resolve_tracking_uri(tracking_uri, workdir)
    return mlflow.MlflowClient(uri, registry_uri=uri)


# ---------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------
def git_commit(cwd: Optional[os.PathLike] = None) -> Optional[str]:
    """``git rev-parse HEAD`` of ``cwd`` (best effort: None outside a repo / without git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


# ---------------------------------------------------------------------------------------
# parent and child runs
# ---------------------------------------------------------------------------------------
def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def find_run(experiment_id: str, tags: Mapping[str, str], client=None):
    """The newest run in the experiment carrying all ``tags`` (or None)."""
    client = client or get_client()
    clauses = [f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()]
    runs = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(clauses),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def find_pipeline_run(pipeline_run_id: str, experiment: str = DEFAULT_EXPERIMENT, client=None):
    client = client or get_client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return find_run(
        exp.experiment_id, {TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_ROLE: "pipeline"}, client
    )


def start_pipeline_run(
    pipeline_run_id: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: Optional[str] = None,
    workdir: Optional[os.PathLike] = None,
    dataset_fingerprint: Optional[str] = None,
    dvc_rev: Optional[str] = None,
    git_sha: Optional[str] = "auto",
    params: Any = None,
    tags: Optional[Mapping[str, Any]] = None,
    run_name: Optional[str] = None,
) -> str:
    """Find or create the parent run of ``pipeline_run_id``; returns its MLflow run id.

    The run is left open (status RUNNING) for the steps; :func:`end_pipeline_run` closes
    it. Calling again (a retried or later step) returns the same run and adds any new
    tags/params given.
    """
    exp_id = configure(tracking_uri, experiment, workdir)
    client = get_client(tracking_uri, workdir)
    all_tags: dict[str, Any] = {TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_ROLE: "pipeline"}
    sha = git_commit() if git_sha == "auto" else git_sha
    if sha:
        all_tags[TAG_GIT_COMMIT] = sha
        all_tags["mlflow.source.git.commit"] = sha
    if dvc_rev:
        all_tags[TAG_DVC_REV] = dvc_rev
    if dataset_fingerprint:
        all_tags[TAG_FINGERPRINT] = dataset_fingerprint
    all_tags.update(tags or {})
    run = find_run(exp_id, {TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_ROLE: "pipeline"}, client)
    if run is None:
        run = client.create_run(
            exp_id, tags=redact_tags(all_tags), run_name=run_name or f"pipeline-{pipeline_run_id}"
        )
    else:
        set_tags(all_tags, run.info.run_id, client=client)
    if params is not None:
        log_params(params, run.info.run_id, client=client)
    return run.info.run_id


def end_pipeline_run(
    pipeline_run_id: str,
    status: str = "FINISHED",
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: Optional[str] = None,
    workdir: Optional[os.PathLike] = None,
) -> Optional[str]:
    """Close the parent run (``FINISHED`` / ``FAILED`` / ``KILLED``); returns its id."""
    client = get_client(tracking_uri, workdir)
    run = find_pipeline_run(pipeline_run_id, experiment, client)
    if run is None:
        return None
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


@contextlib.contextmanager
def step_run(
    pipeline_run_id: str,
    step: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: Optional[str] = None,
    workdir: Optional[os.PathLike] = None,
    params: Any = None,
    tags: Optional[Mapping[str, Any]] = None,
    **parent_kw: Any,
) -> Iterator[str]:
    """Open the child run of ``step`` under the pipeline's parent run (find-or-create both).

    Yields the child run id; inside the block it is MLflow's active run, so
    ``mlflow.log_*`` and :func:`log_pyfunc` land there. The run ends FINISHED, or FAILED
    when the block raises. ``parent_kw`` goes to :func:`start_pipeline_run`.
    """
    mlflow = _mlflow()
    parent_id = start_pipeline_run(
        pipeline_run_id,
        experiment=experiment,
        tracking_uri=tracking_uri,
        workdir=workdir,
        **parent_kw,
    )
    client = get_client(tracking_uri, workdir)
    exp_id = client.get_run(parent_id).info.experiment_id
    child_tags = {TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_STEP: step, TAG_ROLE: "step"}
    child = find_run(exp_id, child_tags, client)
    if child is None:
        all_tags = {**child_tags, "mlflow.parentRunId": parent_id, **(tags or {})}
        for key in (TAG_GIT_COMMIT, TAG_DVC_REV, TAG_FINGERPRINT):
            value = client.get_run(parent_id).data.tags.get(key)
            if value:
                all_tags.setdefault(key, value)
        child = client.create_run(exp_id, tags=redact_tags(all_tags), run_name=step)
    elif tags:
        set_tags(tags, child.info.run_id, client=client)
    run_id = child.info.run_id
    if params is not None:
        log_params(params, run_id, client=client)
    # Make it the active run (nested under whatever is active in this process).
    active = mlflow.active_run()
    nested = active is not None and active.info.run_id != run_id
    with mlflow.start_run(run_id=run_id, nested=nested):
        yield run_id


def _run_id(run_id: Optional[str]) -> str:
    if run_id:
        return run_id
    active = _mlflow().active_run()
    if active is None:
        raise RuntimeError("no MLflow run: pass run_id or call inside step_run()")
    return active.info.run_id


# ---------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------
def set_tags(tags: Mapping[str, Any], run_id: Optional[str] = None, client=None) -> None:
    client = client or get_client()
    rid = _run_id(run_id)
    for key, value in redact_tags(tags).items():
        client.set_tag(rid, key, value)


def log_params(params: Any, run_id: Optional[str] = None, client=None) -> dict[str, str]:
    """Flatten (pydantic / dataclass / dict), redact and log; returns what was logged.

    A param already logged with the same value is skipped (MLflow refuses to change a
    param, and a retried step logs the same config again); a changed value is logged
    under ``<key>.retry`` rather than failing the step.
    """
    from mlflow.entities import Param

    client = client or get_client()
    rid = _run_id(run_id)
    flat = flatten_params(params)
    clean = {k: param_str(v) for k, v in redact_params(flat).items()}
    existing = client.get_run(rid).data.params
    todo = {}
    for key, value in clean.items():
        if key in existing:
            if existing[key] != value and f"{key}.retry" not in existing:
                todo[f"{key}.retry"] = value
            continue
        todo[key] = value
    items = [Param(k, v) for k, v in todo.items()]
    for i in range(0, len(items), 100):
        client.log_batch(rid, params=items[i : i + 100])
    return clean


def _finite_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        import numpy as np

        if isinstance(value, np.generic) and np.issubdtype(value.dtype, np.number):
            return float(value)
    except ImportError:  # pragma: no cover
        pass
    return None


def log_metrics(
    metrics: Mapping[str, Any],
    run_id: Optional[str] = None,
    *,
    step: int = 0,
    prefix: str = "",
    client=None,
) -> dict[str, float]:
    """Log the numeric entries of ``metrics`` (others are skipped); returns them."""
    import time

    from mlflow.entities import Metric

    client = client or get_client()
    rid = _run_id(run_id)
    now = int(time.time() * 1000)
    out = {}
    for key, value in metrics.items():
        num = _finite_number(value)
        if num is None or math.isnan(num):
            continue
        out[prefix + key] = num
    items = [Metric(k, v, now, step) for k, v in out.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(rid, metrics=items[i : i + 1000])
    return out


def log_loss_curve(
    history: Sequence[Mapping[str, Any]],
    run_id: Optional[str] = None,
    *,
    step_key: str = "iteration",
    keys: Sequence[str] = ("loss", "alpha"),
    prefix: str = "train/",
    client=None,
) -> int:
    """Log a training history (``[{iteration, loss, alpha}, ...]``) as stepped metrics.

    Metric names are ``train/loss`` and ``train/alpha``; returns the number of points.
    """
    import time

    from mlflow.entities import Metric

    client = client or get_client()
    rid = _run_id(run_id)
    now = int(time.time() * 1000)
    items = []
    for i, row in enumerate(history):
        step = int(row.get(step_key, i))
        for key in keys:
            num = _finite_number(row.get(key))
            if num is not None and not math.isnan(num):
                items.append(Metric(prefix + key, num, now, step))
    for i in range(0, len(items), 1000):
        client.log_batch(rid, metrics=items[i : i + 1000])
    return len(history)



def log_selection(kind: str, selection: Optional[Mapping[str, Any]], run_id: Optional[str] = None,
                  client=None) -> dict[str, float]:
    """The model kind a train step shipped (tag ``model_kind``) and, for ``model.kind: auto``,
    every candidate's and grid setting's validation metrics (``selection/<candidate>/<metric>``,
    ``selection/grid/<backbone>_<size>_<stats>/image_auroc``)."""
    set_tags({"model_kind": kind, **({"selection_rule": selection.get("rule", "")} if selection else {})},
             run_id, client)
    if not selection:
        return {}
    flat: dict[str, float] = {}
    for name, metrics in (selection.get("candidates") or {}).items():
        for key, value in metrics.items():
            flat[f"selection/{name}/{key}"] = value
    for rec in selection.get("grid") or []:
        tag = f"{rec['backbone']}_{rec['image_size']}_{rec['input_stats']}"
        flat[f"selection/grid/{tag}/image_auroc"] = rec["image_auroc"]
    for key, value in (selection.get("wall_time_s") or {}).items():
        flat[f"selection/wall_time_s/{key}"] = value
    return log_metrics(flat, run_id, client=client)


def log_evaluation(
    metrics_payload: Any,
    run_id: Optional[str] = None,
    *,
    plots_dir: Optional[os.PathLike] = None,
    artifact_path: str = "evaluation",
    client=None,
) -> dict[str, float]:
    """Log an evaluation: its scalar metrics, ``metrics.json``, and the plots the evaluate
    step already drew (``plots_dir``: ROC, PR, overlay grid; they are not drawn again).

    ``metrics_payload`` is the metrics JSON payload (dict) or a path to ``metrics.json``
    (see docs/contracts.md). Returns the scalar metrics logged.
    """
    client = client or get_client()
    rid = _run_id(run_id)
    if isinstance(metrics_payload, (str, os.PathLike)):
        payload = json.loads(Path(metrics_payload).read_text())
    else:
        payload = dict(metrics_payload)
    logged = log_metrics(payload.get("metrics", {}), rid, client=client)
    if payload.get("dataset_fingerprint"):
        client.set_tag(rid, "eval_dataset_fingerprint", str(payload["dataset_fingerprint"]))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.json").write_text(json.dumps(payload, indent=1, default=str))
        client.log_artifacts(rid, tmp, artifact_path)
    if plots_dir is not None and Path(plots_dir).is_dir():
        client.log_artifacts(rid, str(plots_dir), f"{artifact_path}/plots")
    return logged


def log_bundle(
    bundle_dir: os.PathLike, run_id: Optional[str] = None, artifact_path: str = "bundle", client=None
) -> str:
    """Upload the model bundle directory; returns its artifact URI."""
    client = client or get_client()
    rid = _run_id(run_id)
    client.log_artifacts(rid, str(bundle_dir), artifact_path)
    return f"runs:/{rid}/{artifact_path}"


def log_dataset_input(
    dataset_uri: str,
    fingerprint: str,
    run_id: Optional[str] = None,
    *,
    name: str = "dataset",
    dvc_rev: Optional[str] = None,
    context: str = "training",
    n_images: Optional[int] = None,
    client=None,
) -> None:
    """Record the dataset as an MLflow run input (``mlflow.data`` MetaDataset).

    Source = ``dataset_uri`` (a folder, an ``s3://`` prefix or a DVC path), digest =
    the manifest fingerprint; the DVC revision goes to the input tags and the run tags.
    """
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = client or get_client()
    rid = _run_id(run_id)
    dataset_uri = redact_value(str(dataset_uri), secret_env_values())
    source = _dataset_source(dataset_uri)
    ds = MetaDataset(source=source, name=name, digest=str(fingerprint)[:36])
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    if dvc_rev:
        tags.append(InputTag(TAG_DVC_REV, str(dvc_rev)))
    if n_images is not None:
        tags.append(InputTag("n_images", str(n_images)))
    client.log_inputs(rid, datasets=[DatasetInput(dataset=ds._to_mlflow_entity(), tags=tags)])
    run_tags: dict[str, Any] = {TAG_FINGERPRINT: fingerprint, "dataset_uri": dataset_uri}
    if dvc_rev:
        run_tags[TAG_DVC_REV] = dvc_rev
    set_tags(run_tags, rid, client=client)


def _dataset_source(uri: str):
    """A DatasetSource for ``uri``: MLflow's own for files/s3/http, else a plain URI one."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    import warnings

    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways"
            return resolve_dataset_source(uri)
    except Exception:
        pass
    # dvc://, git+..., or anything MLflow has no resolver for: keep the URI as-is.
    return HTTPDatasetSource(url=uri)
