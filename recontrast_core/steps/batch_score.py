"""batch_score: a registered model (``models:/name@alias``) over a folder or ``s3://``
prefix of images -> a results table, resumable part by part
(:mod:`recontrast_core.mlops.batch_scoring`). A step like the others for KFP (the batch
scoring pipeline's one component); the CLI is ``recontrast batch-score``. No DVC stage:
it scores production images, it does not build the model."""

from __future__ import annotations

import json

from ..mlops.batch_scoring import output_for_run, run_batch_scoring
from .records import Port, StepRecord, register_step


def _component(v: dict) -> str:
    output = output_for_run(v["output_uri"], v["kfp_run_id"] if v["run_subfolder"] else "")
    summary = run_batch_scoring(v["model_uri"], [v["input_uri"]], output, chunk_size=v["chunk_size"],
                                device=v["device"], progress=False)
    for key in ("images", "scored", "reused", "unreadable", "anomalous"):
        v["metrics"].log_metric(key, float(summary[key]))
    for row in summary["failed"]:
        print(f"unreadable: {row['path']}: {row['error']}")
    return json.dumps({**summary, "failed": summary["failed"][:100]}, default=str)


RECORD = register_step(StepRecord(
    name="batch_score",
    summary="Returns the run's summary JSON (counts, results URIs, up to 100 unreadable images); "
            "``run_subfolder`` writes to ``output_uri/<KFP run id>/`` instead of ``output_uri``.",
    run=run_batch_scoring, sections=(), cli=None, component=_component, settings=False,
    kfp_params=(("model_uri", str), ("input_uri", str), ("output_uri", str), ("chunk_size", int), ("device", str),
                ("run_subfolder", bool)),
    outputs=(Port("metrics", "Metrics"),),
    returns=(("Output", str),),
))
