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

Links into the MLflow UI
------------------------
:func:`ui_url` builds every link the tool prints or logs (an experiment, a run, an
artifact, a registered model version). MLflow 3's UI opens an experiment in its GenAI view
(traces, "Evaluation runs") unless the URL says ``?workflowType=machine_learning`` (or the
browser last chose "Machine learning" in the sidebar); the experiment tag
``mlflow.experimentKind`` does not change that in MLflow 3.17. So every link carries that
parameter and opens the classic runs table. MLflow's own "View run ... at" lines (printed
when a run on a tracking server ends) lack it: :func:`step_run` and
:func:`end_pipeline_run` turn them off and log this module's links instead (stderr).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from typing import Any, Iterator, Mapping, Optional
from urllib.parse import quote, urlsplit, urlunsplit

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

# The MLflow UI: where `mlflow ui` / `mlflow server` listen by default, and the query that
# opens the classic (machine-learning) view instead of the GenAI one (module doc).
DEFAULT_UI_URL = "http://127.0.0.1:5000"
ML_VIEW_QUERY = "workflowType=machine_learning"
_SUPPRESS_MLFLOW_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


# ---------------------------------------------------------------------------------------
# links into the MLflow UI
# ---------------------------------------------------------------------------------------
def ui_base_url(tracking_uri: Optional[str] = None) -> str:
    """The UI's address: a tracking server's own (``http(s)://host:port[/prefix]``, never
    its user or password), else :data:`DEFAULT_UI_URL` (where ``mlflow ui`` on a SQLite or
    file store listens)."""
    uri = tracking_uri if tracking_uri is not None else resolve_tracking_uri()
    parts = urlsplit(str(uri))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return DEFAULT_UI_URL
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def ui_url(
    tracking_uri: Optional[str] = None,
    *,
    experiment_id: Optional[str] = None,
    run_id: Optional[str] = None,
    artifact_path: Optional[str] = None,
    model_name: Optional[str] = None,
    version: Optional[str] = None,
) -> str:
    """The one builder of MLflow UI links, each opening the classic runs view
    (``?workflowType=machine_learning``, module doc):

    * ``experiment_id``: the experiment's runs table, ``<ui>/#/experiments/<id>/runs?...``;
    * ``+ run_id``: the run, ``.../runs/<run_id>?...``; ``+ artifact_path``: that artifact's
      preview on the run's Artifacts tab;
    * ``model_name`` (``+ version``): the registered model (version) page;
    * nothing: the experiments list.
    """
    base = ui_base_url(tracking_uri)
    if model_name is not None:
        path = f"/models/{quote(str(model_name), safe='')}"
        if version is not None:
            path += f"/versions/{quote(str(version), safe='')}"
    elif experiment_id is not None:
        path = f"/experiments/{quote(str(experiment_id), safe='')}/runs"
        if run_id is not None:
            path += f"/{quote(str(run_id), safe='')}"
            if artifact_path:
                path += "/artifacts/" + quote(str(artifact_path).strip("/"), safe="/")
    else:
        path = "/experiments"
    return f"{base}/#{path}?{ML_VIEW_QUERY}"


def pipeline_links(
    pipeline_run_id: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: Optional[str] = None,
    model_name: Optional[str] = None,
    version: Optional[str] = None,
) -> dict[str, str]:
    """``{"mlflow_experiment", "mlflow_run", "mlflow_model_version"}``: UI links to the
    pipeline's experiment, its parent run and the registered version (those that exist).
    Best effort: a store that cannot be read gives fewer links, never an error."""
    links: dict[str, str] = {}
    try:
        client = get_client(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            links["mlflow_experiment"] = ui_url(tracking_uri, experiment_id=exp.experiment_id)
            run = find_run(exp.experiment_id, {TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_ROLE: "pipeline"}, client)
            if run is not None:
                links["mlflow_run"] = ui_url(tracking_uri, experiment_id=exp.experiment_id, run_id=run.info.run_id)
    except Exception:  # a link is a convenience: the run itself already succeeded
        pass
    if model_name and version:
        links["mlflow_model_version"] = ui_url(tracking_uri, model_name=model_name, version=version)
    return links


def _log_run_link(client, run_id: str) -> None:
    """One stderr line with the run's UI link, where MLflow would print its own (a
    tracking server)."""
    uri = str(getattr(client, "tracking_uri", "") or "")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        run = client.get_run(run_id)
        url = ui_url(uri, experiment_id=run.info.experiment_id, run_id=run_id)
        sys.stderr.write(f"MLflow run {run.info.run_name}: {url}\n")
    except Exception:
        pass


@contextlib.contextmanager
def own_run_links() -> Iterator[None]:
    """MLflow's "View run ... at" lines off (they open the GenAI view) while inside."""
    before = os.environ.get(_SUPPRESS_MLFLOW_LINKS)
    os.environ[_SUPPRESS_MLFLOW_LINKS] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_SUPPRESS_MLFLOW_LINKS, None)
        else:
            os.environ[_SUPPRESS_MLFLOW_LINKS] = before


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
    with own_run_links():
        client.set_terminated(run.info.run_id, status=status)
    _log_run_link(client, run.info.run_id)
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
    with own_run_links():
        with mlflow.start_run(run_id=run_id, nested=nested):
            yield run_id
    _log_run_link(client, run_id)
