"""monitor: a deployed model's scores (a batch-scoring output or a score log, folder or
``s3://``) judged against its calibration's reference, window by window
(:mod:`recontrast_core.mlops.monitoring`, docs/operations.md). A step like the others for
KFP (the monitor pipeline's first task, ``pipelines/monitor_pipeline.py``); the CLI is
``recontrast monitor``. No DVC stage: it watches production, it does not build the model.

The component returns the last window's ``verdict``, whether a retraining is due
(``retrain``: the last ``monitor.retrain_after`` windows are all ``retrain`` and none of them
triggered one already), its ``reason`` and the MLflow runs of those windows
(``window_runs``, JSON), which the pipeline's submit task marks once it has submitted."""

from __future__ import annotations

import json

from ..config import PipelineConfig
from ..mlops.monitoring import run_monitor, summary_of
from .records import Port, StepRecord, register_step


def _component(v: dict) -> tuple:
    cfg = PipelineConfig.model_validate(v["settings"])
    report = run_monitor(v["model_uri"], v["scores_uri"], cfg=cfg.monitor, window=v["window"] or None,
                         since=v["since"] or None, images=v["images_uri"] or None, out=v["report"].path,
                         tracking_uri=cfg.tracking.tracking_uri, track=True, progress=False)
    for key, value in summary_of(report).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            v["metrics"].log_metric(key, float(value))
    for w in report["windows"][-5:]:
        print(f"window {w['label']}: {w['verdict']}" + (f" ({'; '.join(w['reasons'])})" if w["reasons"] else ""))
    retrain = report["retrain"]
    return (report["verdict"], bool(retrain["due"]), retrain.get("reason", ""),
            json.dumps(retrain.get("mlflow_runs", [])))


RECORD = register_step(StepRecord(
    name="monitor",
    summary="``report``: folder with monitor.json and monitor.png; ``verdict`` of the last window; "
            "``retrain``: a retraining is due (``reason``; ``window_runs``: the MLflow runs of those windows).",
    run=run_monitor, sections=("monitor", "tracking"), cli=None, component=_component,
    kfp_params=(("model_uri", str), ("scores_uri", str), ("images_uri", str), ("window", str), ("since", str)),
    outputs=(Port("report", "Artifact"), Port("metrics", "Metrics")),
    returns=(("verdict", str), ("retrain", bool), ("reason", str), ("window_runs", str)),
))
