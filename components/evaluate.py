"""evaluate: the bundle (and the training-free baseline) on the test split -> metrics.json,
scores.csv, plots."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_op(
    bundle: Input[Model],
    dataset: Input[Dataset],
    settings: dict,
    pipeline_run_id: str,
    kfp_run_id: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
) -> NamedTuple("EvaluateOutputs", [("image_auroc", float), ("pixel_auroc", float)]):
    """``report``: folder with metrics.json (+ scores.csv, plots/); ``metrics``: the scalars."""
    import math
    from collections import namedtuple

    from recontrast_core.config import PipelineConfig
    from recontrast_core.runtime import read_json
    from recontrast_core.steps import evaluate

    path = evaluate(bundle.path, dataset.path, report.path, PipelineConfig.model_validate(settings),
                    pipeline_run_id=pipeline_run_id or kfp_run_id, progress=False)
    payload = read_json(path)
    scalars = {k: float(v) for k, v in payload["metrics"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    for key, value in scalars.items():
        metrics.log_metric(key, value)
    report.metadata["dataset_fingerprint"] = payload.get("dataset_fingerprint") or ""
    out = namedtuple("EvaluateOutputs", ["image_auroc", "pixel_auroc"])
    return out(scalars.get("image_auroc", float("nan")), scalars.get("pixel_auroc", float("nan")))
