"""ingest: fetch (local folder, s3:// prefix, DVC repository path), validate and hash a
dataset into ``manifest.json`` + ``ingest.json`` + ``dataset_card.json`` (the report of
``recontrast data check``, also logged to MLflow as ``ingest/dataset_card.json``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import PipelineConfig
from ..data.layouts import PATH_OPTIONS, read_dataset, resolve_layout
from ..data.report import DATASET_CARD_FILE, dataset_report
from ..data.validate import validate_manifest
from ..mlops.storage import download_s3_prefix, fetch_dvc_path, redacted_uri
from ..runtime import atomic_write_json, ensure_output_dir, step_outputs
from .artifacts import DATA_DIR, INGEST_FILE, MANIFEST_FILE, PathLike
from .records import DvcStage, Port, StepRecord, register_step, component_run_id
from .tracked import log_artifacts, step_tracking


def _resolve_layout_options(options: Optional[Mapping[str, Any]], root: Path) -> dict:
    """Path-valued layout options (``layouts.PATH_OPTIONS``: normal_dir, abnormal_dir,
    mask_dir, annotations, images, split_csv) made absolute, relative to the dataset root."""
    out = dict(options or {})
    for key in PATH_OPTIONS:
        if out.get(key) and not Path(str(out[key])).is_absolute():
            out[key] = str(root / str(out[key]))
    return out


def ingest(
    out_dir: PathLike,
    settings: PipelineConfig = PipelineConfig(),
    *,
    dvc_remote: Optional[str] = None,
    pipeline_run_id: Optional[str] = None,
    progress: bool = False,
) -> Path:
    """Fetch, validate and hash the dataset of ``settings.data``; write ``manifest.json`` +
    ``ingest.json``.

    ``data.source``: a local folder (or manifest.json); an ``s3://bucket/prefix``
    (downloaded to ``out_dir/data``, endpoint from ``data.s3_endpoint_url`` or the
    environment: :func:`recontrast_core.runtime.s3_endpoint`); or, with ``data.dvc_repo``,
    a path inside that DVC-tracked git repository at ``data.dvc_rev`` (fetched to
    ``out_dir/data`` through ``DVCFileSystem``). A dataset that fails validation raises
    :class:`~recontrast_core.errors.DataValidationError` naming the file, and no manifest
    is written. Returns the manifest path.
    """
    d, tracking = settings.data, settings.tracking
    source, layout, dvc_repo, dvc_rev = d.source, d.layout, d.dvc_repo, d.dvc_rev
    s3_endpoint_url, copy_local, check_decode, layout_options = d.s3_endpoint_url, d.copy_local, d.check_decode, d.layout_options
    allow_duplicates = d.allow_duplicates

    out = ensure_output_dir(out_dir).resolve()
    data_dir = out / DATA_DIR
    source = str(source)
    commit: Optional[str] = None
    fetch: dict[str, Any] = {}
    if dvc_repo:
        kind = "dvc"
        commit = fetch_dvc_path(
            dvc_repo, source, data_dir, rev=dvc_rev, remote=dvc_remote, s3_endpoint_url=s3_endpoint_url
        )
        local = data_dir
        dataset_uri = f"dvc+{redacted_uri(str(dvc_repo))}#{source.strip('/')}@{commit or dvc_rev or 'HEAD'}"
    elif source.startswith("s3://"):
        kind = "s3"
        fetch = download_s3_prefix(source, data_dir, endpoint_url=s3_endpoint_url)
        local = data_dir
        dataset_uri = source
    else:
        kind = "local"
        src = Path(source).expanduser().resolve()
        dataset_uri = str(src)
        if copy_local and src.is_dir():
            if data_dir.exists():
                shutil.rmtree(data_dir)
            shutil.copytree(src, data_dir)
            local = data_dir
        else:
            local = src
    materialised = local == data_dir

    params = {
        "source": dataset_uri,
        "source_kind": kind,
        "layout": layout,
        "dvc_rev": dvc_rev,
        "check_decode": check_decode,
        **({"allow_duplicates": True} if allow_duplicates else {}),
        **({"layout_options": dict(layout_options)} if layout_options else {}),
    }
    with step_outputs(out, "ingest"), step_tracking("ingest", pipeline_run_id, tracking, params=params,
                                                    dvc_rev=commit or dvc_rev) as run_id:
        options = _resolve_layout_options(layout_options, local)
        layout_read = resolve_layout(local, layout, options)
        manifest = read_dataset(local, layout=layout_read, **options)
        report = validate_manifest(manifest, check_decode=check_decode, progress=progress,
                                   allow_duplicates=allow_duplicates)
        manifest = manifest.with_hashes()
        mpath = manifest.save(out / MANIFEST_FILE)
        card = dataset_report(manifest, report, layout=layout_read, source=dataset_uri)
        atomic_write_json(out / DATASET_CARD_FILE, card)
        counts = {
            "n_images": len(manifest),
            "train_normal": int(report.counts["train"]["0"]),
            "train_anomalous": int(report.counts["train"]["1"]),
            "test_normal": int(report.counts["test"]["0"]),
            "test_anomalous": int(report.counts["test"]["1"]),
            "masks": int(report.n_masks),
        }
        info = {
            "source": dataset_uri,
            "source_kind": kind,
            "dvc_repo": redacted_uri(str(dvc_repo)) if dvc_repo else None,
            "dvc_rev": dvc_rev,
            "dvc_commit": commit,
            "fingerprint": manifest.fingerprint,
            "counts": counts,
            "defect_counts": dict(report.defect_counts),
            "warnings": list(report.warnings),
            "data_dir": DATA_DIR if materialised else None,
            "fetch": fetch,
        }
        atomic_write_json(out / INGEST_FILE, info)
        if run_id is not None:
            from ..mlops import tracking as mlflow_tracking

            mlflow_tracking.start_pipeline_run(
                pipeline_run_id, experiment=tracking.experiment, tracking_uri=tracking.tracking_uri or None,
                dataset_fingerprint=manifest.fingerprint, dvc_rev=commit or dvc_rev,
            )
            mlflow_tracking.log_dataset_input(
                dataset_uri, manifest.fingerprint, run_id,
                dvc_rev=commit or dvc_rev, n_images=len(manifest),
            )
            mlflow_tracking.log_metrics({f"data/{k}": v for k, v in counts.items()}, run_id)
            log_artifacts(run_id, out / INGEST_FILE, "ingest", tracking)
            log_artifacts(run_id, out / DATASET_CARD_FILE, "ingest", tracking)
    return mpath


# ----------------------------------------------------------------------------- its record
def _cli(args, settings: PipelineConfig, progress: bool, pipeline_run_id: Optional[str]) -> Path:
    return ingest(args.out, settings, pipeline_run_id=pipeline_run_id, progress=progress)


def _component(v: dict) -> tuple:
    from ..runtime import read_json
    from .settings import with_run_values

    dataset = v["dataset"]
    ingest(dataset.path, with_run_values(v["settings"], source=v["source"]), pipeline_run_id=component_run_id(v))
    info = read_json(Path(dataset.path) / INGEST_FILE)
    dataset.metadata.update({"fingerprint": info["fingerprint"], "dvc_commit": info["dvc_commit"] or "",
                             **info["counts"]})
    return info["fingerprint"], int(info["counts"]["n_images"])


RECORD = register_step(StepRecord(
    name="ingest",
    summary="Writes manifest.json, ingest.json (and data/ for remote sources) into ``dataset``. "
            "``settings``: the whole PipelineConfig (JSON); ``source`` overrides data.source.",
    run=ingest, sections=("data", "tracking"), cli=_cli, component=_component,
    outputs=(Port("dataset", "Dataset"),),
    run_values=(("source", str),),
    returns=(("fingerprint", str), ("n_images", int)),
    dvc=DvcStage(out="artifacts/ingest", extra_args="--no-progress", data=("${data.source}",)),
))
