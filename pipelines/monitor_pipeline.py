"""The monitor pipeline: ``monitor`` (the step record's component,
:mod:`recontrast_core.steps.monitor`) judges the deployed model's scores window by window;
when a retraining is due (the last ``monitor.retrain_after`` windows all ``retrain``, none of
them having triggered one already) and ``retrain`` is on, ``submit-retraining`` submits the
training pipeline (:mod:`recontrast_core.pipelines.training_pipeline`) through the project's
KFP client (:func:`recontrast_core.pipelines.client.submit`) with the reason recorded:

* the KFP run is named ``recontrast-retrain-by-monitor-<UTC time>``;
* its ``pipeline_run_id`` is ``monitor-retrain-<this run's KFP id>``, and the MLflow parent
  run of that id (the training's, :mod:`recontrast_core.mlops.tracking`) is created with
  the tags ``retrain.reason``, ``retrain.trigger`` (``monitor``) and ``retrain.kfp_run_id``;
* the MLflow runs of the triggering windows get ``monitor.retrain_submitted`` (the KFP run
  id) and ``monitor.retrain_reason``: they do not count towards the next retraining.

Scheduled like the others (``recontrast pipeline monitor schedule --cron ...``: a KFP
recurring run, one at a time, no catch-up). Parameters: ``scores_uri`` (a score log or a
batch-scoring output, ``s3://``), ``model_uri`` (default the champion), ``images_uri`` (the
images, for their input statistics; empty: none), ``window`` / ``since`` (empty: the
settings' ``monitor.window``, no limit), ``settings`` (the whole PipelineConfig: the
monitor's rules, the tracking, and the settings the retraining runs with), ``retrain``,
``kfp_host`` (the KFP API as the pod reaches it: the in-cluster service by default) and
``experiment`` (the KFP experiment of the retraining run).

``submit_retrain_op`` is the one component written by hand: it calls the pipelines layer's
own KFP client, which no step may import (docs/architecture.md, "Layers").

Regenerate the golden YAML after an intended change with::

    env -u RECONTRAST_IMAGE python -m recontrast_core.pipelines.monitor_pipeline
"""

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Callable, Optional

from kfp import dsl

from recontrast_core.components import IMAGE, monitor_op
from recontrast_core.config import PipelineConfig

from .compile import compile_to
from .task_settings import cluster_env, io_retry

PIPELINE_NAME = "recontrast-monitor"
DEFAULT_MODEL_URI = "models:/recontrast@champion"
IN_CLUSTER_KFP = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
DEFAULT_SETTINGS = PipelineConfig().model_dump(mode="json", exclude_none=True)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def submit_retrain_op(settings: dict, reason: str, window_runs: str, kfp_host: str, experiment: str, image: str,
                      kfp_run_id: str) -> str:
    """Submit the training pipeline (``settings``) with ``reason``; returns the submission JSON."""
    import os

    os.environ.setdefault("RECONTRAST_IMAGE", image)  # the retraining runs on this pipeline's image
    from recontrast_core.pipelines.monitor_pipeline import submit_retraining

    return submit_retraining(settings, reason, window_runs, kfp_host, experiment, kfp_run_id)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="ReContrast drift monitor: scores (and images) against the champion's reference; "
                "retrains after monitor.retrain_after consecutive retrain windows",
)
def monitor_pipeline(
    scores_uri: str,
    model_uri: str = DEFAULT_MODEL_URI,
    images_uri: str = "",
    window: str = "",
    since: str = "",
    settings: dict = DEFAULT_SETTINGS,
    retrain: bool = True,
    kfp_host: str = IN_CLUSTER_KFP,
    experiment: str = "recontrast",
    pipeline_run_id: str = "",
) -> str:
    """Returns the last window's verdict (ok, watch, retrain)."""
    mon = monitor_op(settings=settings, model_uri=model_uri, scores_uri=scores_uri, images_uri=images_uri,
                     window=window, since=since, pipeline_run_id=pipeline_run_id,
                     kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    cluster_env(io_retry(mon.set_display_name("monitor")))
    mon.set_cpu_request("2").set_memory_request("4Gi").set_memory_limit("8Gi")
    mon.set_caching_options(False)  # the scores and the alias change outside KFP
    with dsl.If(retrain == True, name="retrain-enabled"):  # noqa: E712 - a KFP condition, not Python's
        with dsl.If(mon.outputs["retrain"] == True, name="retrain-due"):  # noqa: E712
            sub = submit_retrain_op(settings=settings, reason=mon.outputs["reason"],
                                    window_runs=mon.outputs["window_runs"], kfp_host=kfp_host,
                                    experiment=experiment, image=IMAGE, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            cluster_env(sub.set_display_name("submit-retraining"))
            sub.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi")
            sub.set_caching_options(False)
    return mon.outputs["verdict"]


def pipeline_arguments(scores_uri: str, model_uri: str = DEFAULT_MODEL_URI, images_uri: str = "", window: str = "",
                       since: str = "", cfg: Optional[PipelineConfig] = None, retrain: bool = True,
                       kfp_host: str = IN_CLUSTER_KFP, experiment: str = "recontrast") -> dict:
    """The pipeline's arguments (one place that names them)."""
    cfg = cfg or PipelineConfig()
    return {"scores_uri": scores_uri, "model_uri": model_uri, "images_uri": images_uri, "window": window,
            "since": since, "settings": cfg.model_dump(mode="json", exclude_none=True), "retrain": retrain,
            "kfp_host": kfp_host, "experiment": experiment}


def training_arguments(cfg: PipelineConfig, pipeline_run_id: str) -> dict:
    """The training pipeline's arguments for a retraining (a plain-folder source is copied
    into the ingest artifact, as ``recontrast pipeline submit`` does)."""
    from .training_pipeline import pipeline_arguments as training

    if not cfg.data.dvc_repo and not cfg.data.source.startswith("s3://"):
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"copy_local": True})})
    return training(cfg, pipeline_run_id)


def submit_retraining(settings: dict, reason: str, window_runs: str, kfp_host: str, experiment: str,
                      monitor_run_id: str, *, submit_fn: Optional[Callable[..., dict]] = None,
                      package_path: Optional[str] = None) -> str:
    """Submit the training pipeline (module doc) and record why; returns the submission as
    JSON (``run_id``, ``run_name``, ``pipeline_run_id``, ``reason``, ``marked``). Recording
    is best effort once the run is submitted (a tracking server down does not undo it)."""
    from .client import submit

    cfg = PipelineConfig.model_validate(settings)
    now = _dt.datetime.now(_dt.timezone.utc)
    pipeline_run_id = f"monitor-retrain-{monitor_run_id or f'{now:%Y%m%d%H%M%S}'}"
    run_name = f"recontrast-retrain-by-monitor-{now:%Y%m%d-%H%M%S}"
    result = (submit_fn or submit)(kfp_host, training_arguments(cfg, pipeline_run_id), experiment=experiment,
                                   run_name=run_name, package_path=package_path, pipeline="training")
    out = {**result, "pipeline_run_id": pipeline_run_id, "reason": reason, "marked": [], "recorded": []}
    runs = json.loads(window_runs or "[]")
    try:
        from recontrast_core.mlops.monitoring import mark_submitted

        mark_submitted(runs, result["run_id"], reason, cfg.tracking.tracking_uri)
        out["marked"] = runs
    except Exception as exc:  # noqa: BLE001
        out["marked_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        from recontrast_core.mlops.tracking import start_pipeline_run

        parent = start_pipeline_run(pipeline_run_id, experiment=cfg.tracking.experiment,
                                    tracking_uri=cfg.tracking.tracking_uri, git_sha=None,
                                    tags={"retrain.reason": reason[:4900], "retrain.trigger": "monitor",
                                          "retrain.kfp_run_id": result["run_id"]})
        out["recorded"] = [parent]
    except Exception as exc:  # noqa: BLE001
        out["recorded_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(f"submitted the training pipeline ({result['run_id']}): {reason}")
    return json.dumps(out, default=str)


def compile_pipeline(path: os.PathLike | str) -> Path:
    """Write the pipeline's KFP IR YAML to ``path``; returns it."""
    return compile_to(monitor_pipeline, path)


GOLDEN_PATH = Path(__file__).resolve().parent / "compiled" / "monitor_pipeline.yaml"


if __name__ == "__main__":  # pragma: no cover
    print(compile_pipeline(GOLDEN_PATH))
