"""``recontrast adapt``: contrastive adaptation of the encoder (the pipeline's adapt step).

Writes ``OUT/encoder.safetensors`` + ``OUT/encoder.json`` (see :func:`recontrast_core.adapt.run_adapt`);
``recontrast train --init-encoder OUT/encoder.safetensors`` starts ReContrast from it.
Bad settings (unknown method, more shots than normal training images) exit with code 2
and one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import console, emit_json, params_option, set_option, settings_from, summary_table, user_errors, validate_with_warnings

METHODS = ("msc", "coft")


def adapt_command(
    dataset: Path = typer.Argument(..., help="MVTec-layout folder or a manifest.json"),
    method: str = typer.Option("msc", "--method", "-m", help="msc (many normal images) | coft (few-shot)"),
    shots: Optional[int] = typer.Option(None, "--shots", "-k", help="Few-shot: adapt on K normal training images (coft: default all)"),
    out: Path = typer.Option(Path("runs/adapt"), "--out", "-o", help="Output folder (encoder.safetensors, encoder.json)"),
    config: Optional[Path] = params_option(),
    epochs: Optional[int] = typer.Option(None, help="Epochs (MSC: passes over the images; COFT: coft.steps_per_epoch steps each)"),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (MSC: images, two views each; COFT: normal views + anomalies)"),
    image_size: Optional[int] = typer.Option(None, help="Square input size (train.image_size: the size ReContrast trains at)"),
    lr: Optional[float] = typer.Option(None, help="MSC learning rate (paper: 1e-5); COFT's is coft.lr in --config"),
    angular_weight: Optional[float] = typer.Option(None, help="MSC angular center term weight (paper default 0 = off; measured for a few hundred images: 32 with --lr 3e-3 --epochs 12, docs/adaptation.md)"),
    crop_min: Optional[float] = typer.Option(None, help="Views: RandomResizedCrop lower scale (paper 0.2; 0.6 keeps small parts)"),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Views: horizontal flips (off where orientation matters)"),
    backbone: Optional[str] = typer.Option(None, help="tf_efficientnet_lite0 (offline default), wide_resnet50_2, resnet18, or any timm name"),
    weights: Optional[str] = typer.Option(None, help="'imagenet' or a local/s3:// state_dict to start from"),
    feature_location: Optional[str] = typer.Option(None, help="auto | bottleneck | expansion (must match training)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    seed: Optional[int] = typer.Option(None),
    layout: str = typer.Option("auto", help="auto | mvtec | manifest"),
    set_: list[str] = set_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable summary on stdout"),
) -> None:
    """Adapt the encoder to the domain (MSC) or to a few normal shots (COFT-AD)."""
    with user_errors():
        if method not in METHODS:
            raise UserError(f"unknown adaptation method {method!r}; choose msc or coft")
        # The encoder settings are the training ones (train.*): the adapted encoder is the
        # one ReContrast then trains, exactly as in the pipeline.
        settings = settings_from(config, {
            "adapt_method": method, "shots": shots, "adapt.epochs": epochs, "adapt.batch_size": batch_size,
            "train.image_size": image_size, "adapt.lr": lr, "train.device": device, "adapt.seed": seed,
            "adapt.angular_weight": angular_weight, "adapt.hflip": hflip,
            "adapt.crop_scale": None if crop_min is None else [crop_min, 1.0],
            "train.backbone.name": backbone, "train.backbone.weights": weights,
            "train.backbone.feature_location": feature_location,
        }, set_)
        from ..adapt import META_FILE, sample_shots
        from ..data.layouts import read_dataset
        from ..steps import adapt as adapt_step
        from ..steps.settings import adapt_settings

        cfg = adapt_settings(settings)
        manifest = read_dataset(dataset, layout=layout)
        if cfg.shots is not None:  # fail fast, before validating every file: k too large
            sample_shots(manifest, cfg.shots, cfg.shots_seed)
        validate_with_warnings(manifest, progress)
        path = adapt_step(manifest, out, settings, progress=progress)
        from ..runtime import load_json

        meta = load_json(path.with_name(META_FILE))
        summary = {
            "encoder": str(path),
            "metadata": str(path.with_name(META_FILE)),
            "method": cfg.method,
            "images": meta["n_images"],
            "epochs": cfg.epochs,
            "final_loss": meta["final_loss"],
            "wall_time_s": meta["wall_time_s"],
            "device": meta["device"],
        }
        console.print(summary_table(f"adapt ({cfg.method})", summary))
        if json_out:
            emit_json(summary)
