"""ingest: a folder, s3:// prefix or DVC repo path -> a validated, hashed dataset."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest_op(
    source: str,
    layout: str,
    dvc_repo: str,
    dvc_rev: str,
    s3_endpoint_url: str,
    copy_local: bool,
    check_decode: bool,
    pipeline_run_id: str,
    kfp_run_id: str,
    tracking_uri: str,
    experiment: str,
    dataset: Output[Dataset],
) -> NamedTuple("IngestOutputs", [("fingerprint", str), ("n_images", int)]):
    """Writes manifest.json, ingest.json (and data/ for remote sources) into ``dataset``."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from recontrast_core import steps

    steps.ingest(
        source,
        dataset.path,
        layout=layout,
        dvc_repo=dvc_repo or None,
        dvc_rev=dvc_rev or None,
        s3_endpoint_url=s3_endpoint_url or None,
        copy_local=copy_local,
        check_decode=check_decode,
        pipeline_run_id=pipeline_run_id or kfp_run_id,
        tracking_uri=tracking_uri or None,
        experiment=experiment,
    )
    info = json.loads((Path(dataset.path) / steps.INGEST_FILE).read_text())
    dataset.metadata.update({"fingerprint": info["fingerprint"], "dvc_commit": info["dvc_commit"] or "",
                             **info["counts"]})
    out = namedtuple("IngestOutputs", ["fingerprint", "n_images"])
    return out(info["fingerprint"], int(info["counts"]["n_images"]))
