"""``recontrast recalibrate --model URI NORMALS...``: a new threshold and normalisation from
new normal images, same weights, registered as a new version through the recalibration gate
(:mod:`recontrast_core.steps.recalibrate`; docs/operations.md, "Recalibrate")."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, emit_json, params_option, set_option, settings_from, summary_table, user_errors


def recalibrate_command(
    normals: list[str] = typer.Argument(..., metavar="NORMALS...",
                                        help="Normal images: files, folders or s3://bucket/prefix/"),
    model: str = typer.Option(..., "--model", "-m", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., an "
                                                         "s3:// bundle or a bundle folder"),
    out: Path = typer.Option(Path("runs/recalibrate"), "--out", "-o",
                             help="bundle/ (shared weights, new calibration), recalibration.json, recalibrate.json"),
    target_fpr: Optional[float] = typer.Option(None, "--target-fpr", help="False-positive rate the threshold aims at "
                                               "on the normals (default: calibration.target_fpr, 0.01)"),
    min_normals: int = typer.Option(20, "--min-normals", min=1, help="The gate refuses fewer normal images"),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Labelled data (a dataset or manifest.json): the "
                                             "registry floors are checked on it"),
    register: bool = typer.Option(True, "--register/--no-register", help="Register the new bundle (default) or "
                                  "only write it"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking/registry URI"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    config: Optional[Path] = params_option(),
    set_: list[str] = set_option(),
    json_out: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Fit a new threshold and score normalisation on new normal images (the training rule:
    the 1 - target FPR quantile of their scores), write a bundle that shares the weights and
    register it through the gate: enough normals, the FPR on them within target + 1/n, the
    registry floors on --eval data, the parent still the champion. Seconds, not a training run."""
    with user_errors():
        from ..steps.recalibrate import recalibrate

        settings = settings_from(config, {"calibration.target_fpr": target_fpr,
                                          "tracking.tracking_uri": tracking_uri, "train.device": device}, set_)
        manifest = None
        if eval_data is not None:
            from .common import read_validated_dataset

            manifest = read_validated_dataset(eval_data, "auto", progress)
        result = recalibrate(model, normals, out, settings, eval_manifest=manifest, min_normals=min_normals,
                             register=register, progress=progress)
        shown = {k: v for k, v in result.items() if k not in ("labelled_metrics", "images_sha256") and v is not None}
        console.print(summary_table("recalibration", shown))
        if json_out:
            emit_json(result)
