"""train: the model kind ``settings.model.kind`` on the normal training images -> the model
bundle (``auto``: the best of ReContrast, patch-kNN and their fusion on the validation split)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Union

from ..config import PipelineConfig
from ..data.manifest import Manifest
from ..distributed import is_main_process
from ..runtime import ensure_output_dir, step_outputs
from ..fit import fit_detector
from .artifacts import PathLike, bundle_metadata, find_encoder, load_manifest, select_shots, with_local_weights
from .records import DvcStage, Port, StepRecord, component_run_id, register_step
from .tracked import log_artifacts, step_tracking
from .train_job import is_remote, train_from_s3


def train(
    manifest: Union[PathLike, Manifest],
    out_dir: PathLike,
    settings: PipelineConfig,
    *,
    init_encoder: Optional[PathLike] = None,
    resume: bool = False,
    pipeline_run_id: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Train on the manifest's normal training images (``settings.shots`` of them when set:
    then every shot trains and the threshold comes from augmented views of the shots);
    returns the bundle folder (``out_dir/bundle``; checkpoints in ``out_dir/checkpoints``).

    ``init_encoder``: an adapted encoder (file or adapt output folder; a skipped adapt
    output counts as none). Under ``torchrun`` every process calls this; rank 0 alone logs
    to MLflow (and writes the bundle)."""
    out = ensure_output_dir(out_dir)
    cfg = with_local_weights(settings.train, out)
    encoder = find_encoder(init_encoder)
    # the test split stays in: model.kind auto ranks the kinds on its validation half
    everything = select_shots(load_manifest(manifest), settings.shots)
    rows = everything.select(split="train")
    params = {"model": settings.model, "train": cfg, "inference": settings.inference, "calibration": settings.calibration,
              "shots": settings.shots or 0, "init_encoder": "adapted" if encoder else "backbone weights",
              "n_train_images": len(rows)}
    if not is_main_process():
        pipeline_run_id = None  # one MLflow run per step, from rank 0
    # under torchrun rank 0 alone writes (and marks) the folder; the others only train
    with (step_outputs(out, "train") if is_main_process() else contextlib.nullcontext()), \
            step_tracking("train", pipeline_run_id, settings.tracking, params=params,
                          dataset_fingerprint=rows.fingerprint) as run_id:
        result = fit_detector(everything, settings.model, cfg, out, init_encoder=str(encoder) if encoder else None,
                              resume=resume, progress=progress, calibration=settings.calibration,
                              inference=settings.inference, few_shot=bool(settings.shots))
        if run_id is not None:
            from ..mlops import tracking as mlflow_tracking

            if result.history:
                mlflow_tracking.log_loss_curve(result.history, run_id)
            mlflow_tracking.log_metrics({"train/iterations": result.iterations,
                                         "train/wall_time_s": result.wall_time_s,
                                         "train/images_per_s": result.images_per_s}, run_id)
            mlflow_tracking.log_selection(result.kind, result.selection, run_id)
            log_artifacts(run_id, Path(result.bundle_dir) / "bundle.json", "train", settings.tracking)
    return Path(result.bundle_dir)


# ----------------------------------------------------------------------------- its record
def _cli(args, settings: PipelineConfig, progress: bool, pipeline_run_id: Optional[str]):
    if is_remote(args.manifest, args.out, args.encoder):  # a TrainJob's process: S3 in and out
        return train_from_s3(train, args.manifest, args.out, settings, encoder_uri=args.encoder,
                             pipeline_run_id=pipeline_run_id, progress=progress)
    return train(args.manifest, args.out, settings, init_encoder=args.encoder, pipeline_run_id=pipeline_run_id,
                 progress=progress)


def _component(v: dict) -> None:
    from .settings import with_run_values

    bundle, encoder = v["bundle"], v.get("init_encoder")
    cfg = with_run_values(v["settings"], shots=v["shots"])
    bundle_dir = train(v["dataset"].path, bundle.path, cfg, init_encoder=encoder.path if encoder else None,
                       pipeline_run_id=component_run_id(v), progress=False)
    bundle.metadata.update(bundle_metadata(cfg, bundle_dir, bundle.path, adapted=encoder is not None))


RECORD = register_step(StepRecord(
    name="train",
    summary="Writes the model bundle into ``bundle``; ``init_encoder``: the adapt output, if any.",
    run=train, sections=("shots", "model", "train", "inference", "calibration", "tracking"),
    cli=_cli, component=_component,
    inputs=(Port("dataset", "Dataset", flag="manifest", dvc_path="artifacts/ingest"),
            Port("init_encoder", "Artifact", flag="encoder", dvc_path="artifacts/adapt", optional=True)),
    outputs=(Port("bundle", "Model"),),
    run_values=(("shots", int),),
    dvc=DvcStage(out="artifacts/train"),
))
