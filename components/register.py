"""register: log + register the candidate, gate the champion promotion."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_op(
    bundle: Input[Model],
    report: Input[Artifact],
    dataset: Input[Dataset],
    model_name: str,
    primary_metric: str,
    margin: float,
    floors: dict,
    extra_settings: dict,
    device: str,
    pipeline_run_id: str,
    kfp_run_id: str,
    tracking_uri: str,
    experiment: str,
) -> NamedTuple(
    "RegisterOutputs",
    [("promoted", bool), ("version", str), ("decision", str), ("champion", str), ("result", str)],
):
    """The promotion decision as outputs; ``result`` is the full decision JSON.
    ``extra_settings["registry"]``: the other promotion settings (secondary metrics)."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from recontrast_core import steps

    result = steps.register(
        bundle.path,
        Path(report.path) / steps.METRICS_FILE,
        model_name=model_name,
        pipeline_run_id=pipeline_run_id or kfp_run_id,
        manifest_path=dataset.path,
        policy={"primary_metric": primary_metric, "margin": margin, "floors": floors,
                **(extra_settings.get("registry") or {})},
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        device=device,
    )
    out = namedtuple("RegisterOutputs", ["promoted", "version", "decision", "champion", "result"])
    return out(bool(result["promoted"]), str(result["version"]), str(result["decision"]),
               str(result["champion"] or ""), json.dumps(result, default=str))
