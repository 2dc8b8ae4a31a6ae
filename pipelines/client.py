"""Submit and schedule the pipelines on a Kubeflow Pipelines API server: ``training``
(:mod:`recontrast_core.pipelines.training_pipeline`, the default) or ``batch-scoring``
(:mod:`recontrast_core.pipelines.batch_scoring`), chosen with ``pipeline=``.

Both go through ``kfp.Client`` (KFP v2beta1 REST API):

* :func:`submit`: create (or find) the experiment, then one run from the compiled
  package (the package is uploaded with the run request);
* :func:`schedule`: upload the package as a pipeline (or a new version of it), then a
  recurring run with a cron trigger, ``max_concurrency=1`` (a retraining never overlaps
  the previous one) and ``no_catchup=True`` (a paused or late schedule does not fire the
  missed runs when it resumes); the same for a recurring batch scoring.

Authentication is whatever ``kfp.Client`` picks up (``existing_token``, ``KF_PIPELINES_*``
env, in-cluster service-account token); no credential is passed through here.
"""

import contextlib
import datetime as _dt
import functools
import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

DEFAULT_EXPERIMENT = "recontrast"
# pipeline -> (its module, the KFP pipeline name it is uploaded as, the default recurring-run name)
PIPELINES = {
    "training": ("recontrast_core.pipelines.training_pipeline", "recontrast-training", "recontrast-retrain"),
    "batch-scoring": ("recontrast_core.pipelines.batch_scoring", "recontrast-batch-scoring", "recontrast-batch-scoring"),
    "monitor": ("recontrast_core.pipelines.monitor_pipeline", "recontrast-monitor", "recontrast-monitor"),
}


def _quiet_stdout(fn):
    """kfp.Client prints "Experiment details: <url>" lines to stdout; send them to stderr
    so that stdout stays free for results (``--json``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.redirect_stdout(sys.stderr):
            return fn(*args, **kwargs)

    return wrapper


def _client(host: str, namespace: Optional[str] = None, existing_token: Optional[str] = None):
    import kfp

    kw = {"namespace": namespace} if namespace else {}  # kfp's default is "kubeflow"
    return kfp.Client(host=host, existing_token=existing_token, **kw)


def _pipeline(name: str) -> tuple[str, str, str]:
    if name not in PIPELINES:
        from recontrast_core.errors import UserError

        raise UserError(f"unknown pipeline {name!r} (one of {', '.join(PIPELINES)})")
    return PIPELINES[name]


def _package(package_path: Optional[str], tmp: str, pipeline: str = "training") -> str:
    """The compiled package to send: ``package_path``, else ``pipeline`` compiled now."""
    if package_path:
        return str(package_path)
    module = importlib.import_module(_pipeline(pipeline)[0])
    return str(module.compile_pipeline(Path(tmp) / f"{pipeline}.yaml"))


def _clean_params(params: Optional[Mapping[str, Any]]) -> dict:
    """Drop None values (None = use the pipeline's default)."""
    return {k: v for k, v in (params or {}).items() if v is not None}


def ensure_experiment(client, name: str, namespace: Optional[str] = None, description: str = "") -> str:
    """The id of experiment ``name``, created when missing."""
    try:
        exp = client.get_experiment(experiment_name=name, namespace=namespace)
    except ValueError as exc:  # kfp: "No experiment is found with name ..."; anything else is real
        if "No experiment is found" not in str(exc):
            raise
        exp = client.create_experiment(name=name, description=description or None, namespace=namespace)
    return exp.experiment_id


@_quiet_stdout
def submit(
    host: str,
    params: Optional[Mapping[str, Any]] = None,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: Optional[str] = None,
    package_path: Optional[str] = None,
    namespace: Optional[str] = None,
    enable_caching: Optional[bool] = None,
    service_account: Optional[str] = None,
    existing_token: Optional[str] = None,
    pipeline: str = "training",
) -> dict:
    """Submit one run of ``pipeline`` (training or batch-scoring); returns ``{"run_id",
    "experiment_id", "run_url"}``. ``params`` are that pipeline's parameters."""
    _pipeline(pipeline)
    client = _client(host, namespace, existing_token)
    exp_id = ensure_experiment(client, experiment, namespace)
    prefix = "recontrast" if pipeline == "training" else f"recontrast-{pipeline}"
    run_name = run_name or f"{prefix}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory(prefix="recontrast-kfp-") as tmp:
        result = client.create_run_from_pipeline_package(
            _package(package_path, tmp, pipeline),
            arguments=_clean_params(params),
            run_name=run_name,
            experiment_id=exp_id,
            namespace=namespace,
            enable_caching=enable_caching,
            service_account=service_account,
        )
    return {
        "run_id": result.run_id,
        "run_name": run_name,
        "experiment_id": exp_id,
        "run_url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}",
    }


def _upload(client, package: str, pipeline_name: str, namespace: Optional[str]) -> tuple[str, str]:
    """Upload the package as pipeline ``pipeline_name`` (a new version if it exists)."""
    version_name = f"{pipeline_name}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S-%f}"
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(package, pipeline_name=pipeline_name, namespace=namespace)
        pipeline_id = pipeline.pipeline_id
        versions = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1,
                                                 sort_by="created_at desc")
        version_id = versions.pipeline_versions[0].pipeline_version_id
    else:
        version = client.upload_pipeline_version(package, pipeline_version_name=version_name,
                                                 pipeline_id=pipeline_id)
        version_id = version.pipeline_version_id
    return pipeline_id, version_id


@_quiet_stdout
def schedule(
    host: str,
    cron: str,
    params: Optional[Mapping[str, Any]] = None,
    *,
    job_name: Optional[str] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    pipeline_name: Optional[str] = None,
    package_path: Optional[str] = None,
    namespace: Optional[str] = None,
    enable_caching: Optional[bool] = None,
    service_account: Optional[str] = None,
    existing_token: Optional[str] = None,
    pipeline: str = "training",
) -> dict:
    """Create a recurring run of ``pipeline`` (KFP cron: 6 fields, seconds first, e.g.
    ``0 0 3 * * *``; a 5-field expression gets ``0`` seconds prepended). One run at a time,
    no catch-up. ``pipeline_name`` / ``job_name`` default to the pipeline's
    (:data:`PIPELINES`). Returns ``{"recurring_run_id", "pipeline_id",
    "pipeline_version_id", "experiment_id", "cron"}``."""
    _, default_pipeline_name, default_job_name = _pipeline(pipeline)
    pipeline_name = pipeline_name or default_pipeline_name
    job_name = job_name or default_job_name
    fields = cron.split()
    if len(fields) == 5:
        cron = "0 " + cron
    elif len(fields) != 6:
        from recontrast_core.errors import UserError

        raise UserError(f"cron expression {cron!r}: expected 5 or 6 fields")
    client = _client(host, namespace, existing_token)
    exp_id = ensure_experiment(client, experiment, namespace)
    with tempfile.TemporaryDirectory(prefix="recontrast-kfp-") as tmp:
        pipeline_id, version_id = _upload(client, _package(package_path, tmp, pipeline), pipeline_name, namespace)
    job = client.create_recurring_run(
        experiment_id=exp_id,
        job_name=job_name,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=_clean_params(params),
        pipeline_id=pipeline_id,
        version_id=version_id,
        enabled=True,
        enable_caching=enable_caching,
        service_account=service_account,
    )
    return {
        "recurring_run_id": job.recurring_run_id,
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version_id,
        "experiment_id": exp_id,
        "cron": cron,
    }
