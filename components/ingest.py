"""ingest: a folder, s3:// prefix or DVC repo path -> a validated, hashed dataset."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest_op(
    settings: dict,
    source: str,
    pipeline_run_id: str,
    kfp_run_id: str,
    dataset: Output[Dataset],
) -> NamedTuple("IngestOutputs", [("fingerprint", str), ("n_images", int)]):
    """Writes manifest.json, ingest.json (and data/ for remote sources) into ``dataset``.
    ``settings``: the whole PipelineConfig (JSON); ``source`` overrides data.source."""
    from collections import namedtuple
    from pathlib import Path

    from recontrast_core.runtime import read_json
    from recontrast_core.steps import ingest
    from recontrast_core.steps.artifacts import INGEST_FILE
    from recontrast_core.steps.settings import with_run_values

    ingest(dataset.path, with_run_values(settings, source=source), pipeline_run_id=pipeline_run_id or kfp_run_id)
    info = read_json(Path(dataset.path) / INGEST_FILE)
    dataset.metadata.update({"fingerprint": info["fingerprint"], "dvc_commit": info["dvc_commit"] or "",
                             **info["counts"]})
    out = namedtuple("IngestOutputs", ["fingerprint", "n_images"])
    return out(info["fingerprint"], int(info["counts"]["n_images"]))
