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
    settings: dict,
    model_name: str,
    pipeline_run_id: str,
    kfp_run_id: str,
) -> NamedTuple(
    "RegisterOutputs",
    [("promoted", bool), ("version", str), ("decision", str), ("champion", str), ("result", str)],
):
    """The promotion decision as outputs; ``result`` is the full decision JSON. The rule is
    settings.registry (model_name overrides its model name)."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from recontrast_core.steps import register
    from recontrast_core.steps.artifacts import METRICS_FILE
    from recontrast_core.steps.settings import with_run_values

    result = register(bundle.path, Path(report.path) / METRICS_FILE, with_run_values(settings, model_name=model_name),
                      manifest=dataset.path, pipeline_run_id=pipeline_run_id or kfp_run_id)
    out = namedtuple("RegisterOutputs", ["promoted", "version", "decision", "champion", "result"])
    return out(bool(result["promoted"]), str(result["version"]), str(result["decision"]),
               str(result["champion"] or ""), json.dumps(result, default=str))
