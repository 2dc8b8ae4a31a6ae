"""evaluate: the bundle on the test split -> metrics.json, scores.csv, plots."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_op(
    bundle: Input[Model],
    dataset: Input[Dataset],
    device: str,
    pipeline_run_id: str,
    kfp_run_id: str,
    tracking_uri: str,
    experiment: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
) -> NamedTuple("EvaluateOutputs", [("image_auroc", float), ("pixel_auroc", float)]):
    """``report``: folder with metrics.json (+ scores.csv, plots/); ``metrics``: the scalars."""
    import json
    import math
    from collections import namedtuple

    from recontrast_core import steps

    path = steps.evaluate(
        bundle.path,
        dataset.path,
        report.path,
        device=device,
        pipeline_run_id=pipeline_run_id or kfp_run_id,
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        progress=False,
    )
    payload = json.loads(path.read_text())
    for key, value in payload["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(key, float(value))
    report.metadata["dataset_fingerprint"] = payload.get("dataset_fingerprint") or ""

    def num(key):
        value = payload["metrics"].get(key)
        return float(value) if isinstance(value, (int, float)) else float("nan")

    out = namedtuple("EvaluateOutputs", ["image_auroc", "pixel_auroc"])
    return out(num("image_auroc"), num("pixel_auroc"))
