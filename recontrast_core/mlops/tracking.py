"""MLflow adapter: one parent run per pipeline run, one child run per step.

Where runs go (the embedded SQLite default, or ``MLFLOW_TRACKING_URI``):
:mod:`.tracking_store`; what a run records (params, metrics, evaluation, bundle, dataset):
:mod:`.tracking_log`. Both are re-exported here, so callers use this module alone
(``tracking.get_client``, ``tracking.log_metrics``, ...).

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
:func:`~.redaction.redact_params`: a credential never reaches MLflow.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from typing import Any, Iterator, Mapping, Optional

from .redaction import redact_tags

# The adapter's public face: callers use the store and logging functions as tracking.<name>.
from .tracking_log import (  # noqa: F401
    TAG_DVC_REV,
    TAG_FINGERPRINT,
    log_bundle,
    log_dataset_input,
    log_evaluation,
    log_loss_curve,
    log_metrics,
    log_params,
    log_selection,
    set_tags,
)
from .tracking_store import (  # noqa: F401
    DEFAULT_EXPERIMENT,
    configure,
    embedded_tracking_uri,
    get_client,
    mlflow_module,
    resolve_tracking_uri,
)

TAG_PIPELINE_RUN_ID = "pipeline_run_id"
TAG_STEP = "step"
TAG_ROLE = "recontrast.role"  # "pipeline" on parents, "step" on children
TAG_GIT_COMMIT = "git_commit"


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
    mlflow = mlflow_module()
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
