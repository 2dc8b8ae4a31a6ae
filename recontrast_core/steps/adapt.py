"""adapt: MSC or COFT-AD contrastive adaptation of the encoder before training (optional)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

from ..adapt import run_adapt
from ..config import PipelineConfig
from ..data.manifest import Manifest
from ..runtime import atomic_write_json, ensure_output_dir, step_outputs
from .artifacts import with_local_weights, ADAPT_SKIPPED_FILE, ENCODER_FILE, ENCODER_META_FILE, PathLike, load_manifest, select_shots
from .records import DvcStage, Port, StepRecord, component_run_id, register_step
from .settings import adapt_settings
from .tracked import log_artifacts, step_tracking


def adapt(
    manifest: Union[PathLike, Manifest],
    out_dir: PathLike,
    settings: PipelineConfig,
    *,
    pipeline_run_id: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Adapt the encoder (``settings.adapt_method``: msc or coft) on the normal training
    images (``settings.shots`` of them when set); returns ``encoder.safetensors`` (with
    ``encoder.json`` beside it)."""
    out = ensure_output_dir(out_dir)
    cfg = with_local_weights(adapt_settings(settings), out)
    rows = select_shots(load_manifest(manifest), cfg.shots)
    with step_outputs(out, "adapt"), \
            step_tracking("adapt", pipeline_run_id, settings.tracking, params={"adapt": cfg}) as run_id:
        t0 = time.perf_counter()
        encoder = Path(run_adapt(rows, cfg, out, progress=progress))
        if run_id is not None:
            from ..mlops import tracking as mlflow_tracking

            mlflow_tracking.log_metrics({"adapt/wall_time_s": time.perf_counter() - t0}, run_id)
            log_artifacts(run_id, encoder.parent / ENCODER_META_FILE, "adapt", settings.tracking)
    return encoder


def skip_adapt(out_dir: PathLike, reason: str = "adapt_method=none") -> Path:
    """Mark an adapt output as skipped (DVC stages are static; train then starts from
    the backbone's own weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with step_outputs(out, "adapt"):
        for stale in (out / ENCODER_FILE, out / ENCODER_META_FILE):
            stale.unlink(missing_ok=True)
        return atomic_write_json(out / ADAPT_SKIPPED_FILE, {"skipped": True, "reason": reason})


# ----------------------------------------------------------------------------- its record
def _cli(args, settings: PipelineConfig, progress: bool, pipeline_run_id: Optional[str]) -> Path:
    if settings.adapt_method == "none":  # DVC stages are static: mark the output skipped
        return skip_adapt(args.out)
    return adapt(args.manifest, args.out, settings, pipeline_run_id=pipeline_run_id, progress=progress)


def _component(v: dict) -> None:
    from .settings import with_run_values

    encoder = v["encoder"]
    cfg = with_run_values(v["settings"], adapt_method=v["adapt_method"], shots=v["shots"])
    path = adapt(v["dataset"].path, encoder.path, cfg, pipeline_run_id=component_run_id(v), progress=False)
    encoder.metadata.update({"method": v["adapt_method"], "backbone": cfg.train.backbone.name, "file": path.name})


RECORD = register_step(StepRecord(
    name="adapt",
    summary="Writes encoder.safetensors + encoder.json into ``encoder`` (settings.adapt.*; the "
            "encoder follows settings.train.backbone). shots=0: all normal training images.",
    run=adapt, sections=("adapt_method", "shots", "adapt", "train.backbone", "train.image_size", "train.device",
                         "tracking"),
    cli=_cli, component=_component,
    inputs=(Port("dataset", "Dataset", flag="manifest", dvc_path="artifacts/ingest"),),
    outputs=(Port("encoder", "Artifact"),),
    run_values=(("adapt_method", str), ("shots", int)),
    dvc=DvcStage(out="artifacts/adapt"),
))
