"""The ``recontrast`` command: train | evaluate | predict | adapt | pipeline | registry | demo.

Human output (progress bars, tables, errors) goes to stderr; ``--json`` prints one
machine-readable document on stdout. Bad input exits with code 2 and one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .cli_common import config_with_overrides, console, emit_json, read_validated_dataset, summary_table, user_errors

app = typer.Typer(
    name="recontrast",
    help="ReContrast visual anomaly detection: from normal images to a registered, calibrated detector.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatasetArg = typer.Argument(..., help="MVTec-layout folder, a normal-images folder (with --layout folder), or a manifest.json")


def load_manifest(dataset: Path, layout: str, abnormal_dir: Optional[Path], mask_dir: Optional[Path], progress: bool):
    """Read and validate a dataset before any work; raises UserError naming the bad file."""
    options = {"abnormal_dir": abnormal_dir, "mask_dir": mask_dir} if layout == "folder" else {}
    return read_validated_dataset(dataset, layout, progress, **options)


@app.command()
def train(
    dataset: Path = DatasetArg,
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Output folder (checkpoints/, bundle/)"),
    config: Optional[Path] = typer.Option(None, help="YAML file with a 'train:' section (flags override it)"),
    backbone: Optional[str] = typer.Option(None, help="tf_efficientnet_lite0 (offline default), wide_resnet50_2, resnet18, or any timm name"),
    weights: Optional[str] = typer.Option(None, help="'imagenet', 'none', or a local/s3:// state_dict"),
    feature_location: Optional[str] = typer.Option(None, help="auto | bottleneck | expansion"),
    image_size: Optional[int] = typer.Option(None, help="Square input size (paper: 256)"),
    iterations: Optional[int] = typer.Option(None, help="Training iterations (paper: 2000)"),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (paper: 16)"),
    encoder_bn: Optional[str] = typer.Option(None, help="train (default) | eval: encoder BatchNorm mode"),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    checkpoint_every: Optional[int] = typer.Option(None),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Flip/jitter augmentation (on by default with --shots)"),
    shots: Optional[int] = typer.Option(None, "--shots", "-k", help="Few-shot ReContrast: train on K normal images (the adapt step's deterministic choice)"),
    init_encoder: Optional[str] = typer.Option(None, help="Adapted encoder weights (from `recontrast adapt`) for both encoder copies"),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints/last.pt"),
    layout: str = typer.Option("auto", help="auto | mvtec | folder | manifest"),
    abnormal_dir: Optional[Path] = typer.Option(None, help="folder layout: anomalous test images"),
    mask_dir: Optional[Path] = typer.Option(None, help="folder layout: masks for anomalous images"),
    validation_fraction: Optional[float] = typer.Option(None, help="Share of normal train images held out to set the threshold"),
    target_fpr: Optional[float] = typer.Option(None, help="False-positive rate the threshold aims at on held-out normals"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a ReContrast detector on the normal training images of DATASET."""
    with user_errors():
        from .config import CalibrationConfig
        from .train import train_model

        from .config import TrainConfig

        cfg = config_with_overrides(TrainConfig, config, "train", {
            "backbone": {"name": backbone, "weights": weights, "feature_location": feature_location},
            "image_size": image_size, "iterations": iterations, "batch_size": batch_size,
            "encoder_bn": encoder_bn, "seed": seed, "device": device,
            "checkpoint_every": checkpoint_every, "augment": augment,
        })
        calib = CalibrationConfig(**{k: v for k, v in {"validation_fraction": validation_fraction, "target_fpr": target_fpr}.items() if v is not None})
        manifest = load_manifest(dataset, layout, abnormal_dir, mask_dir, progress)
        if shots:
            from .steps import select_shots

            manifest = select_shots(manifest, shots)
            if augment is None:
                cfg = cfg.model_copy(update={"augment": True})
        result = train_model(manifest, cfg, out, init_encoder=init_encoder, resume=resume, progress=progress, calibration=calib)
        summary = {
            "bundle": str(result.bundle_dir),
            "iterations": result.iterations,
            "final_loss": result.history[-1]["loss"] if result.history else None,
            "wall_time_s": round(result.wall_time_s, 1),
            "train_images_per_s": round(result.images_per_s, 2),
        }
        console.print(summary_table("training", summary))
        if json_out:
            emit_json({**summary, "history": result.history})


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="Model bundle folder (from `recontrast train`)"),
    dataset: Path = DatasetArg,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write metrics.json and scores.csv here"),
    layout: str = typer.Option("auto"),
    abnormal_dir: Optional[Path] = typer.Option(None),
    mask_dir: Optional[Path] = typer.Option(None),
    device: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Image AUROC, pixel AUROC, AUPRO (and the paper's per-image AUPRO), F1-max on the test split."""
    with user_errors():
        from .evaluate import evaluate_bundle

        manifest = load_manifest(dataset, layout, abnormal_dir, mask_dir, progress)
        payload = evaluate_bundle(bundle, manifest, out_dir=out, progress=progress, device=device)
        console.print(summary_table(f"evaluation ({payload['n_images']} test images)", payload["metrics"]))
        if json_out:
            emit_json({k: v for k, v in payload.items() if k != "per_image"})


@app.command()
def predict(
    bundle: Path = typer.Argument(..., help="Model bundle folder"),
    paths: list[Path] = typer.Argument(..., help="Image files or folders"),
    out: Optional[Path] = typer.Option(Path("runs/predict"), "--out", "-o", help="results.csv and overlays/ go here"),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays"),
    device: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score new images: score, normalised score (0.5 = threshold) and decision per image."""
    with user_errors():
        from .predict import predict_paths

        rows = predict_paths(bundle, paths, out, overlays=overlays, device=device, progress=progress)
        flagged = sum(r["decision"] for r in rows)
        console.print(summary_table("prediction", {"images": len(rows), "anomalous": flagged, "results": str(Path(out) / "results.csv")}))
        if json_out:
            emit_json(rows)


def _unavailable(reason: str):
    def command() -> None:
        console.print(f"[bold red]error:[/] this command needs the pipeline extra (pip install 'recontrast[pipeline]'): {reason}")
        raise typer.Exit(2)

    return command


def _mount_optional() -> None:
    """Sub-commands whose modules need the [pipeline] extra or are optional."""
    try:
        from .cli_adapt import adapt_command

        app.command("adapt", help="Contrastive domain adaptation of the encoder: MSC or COFT-AD few-shot.")(adapt_command)
    except ImportError:
        pass
    for module, attr, name in (("cli_pipeline", "pipeline_app", "pipeline"), ("cli_registry", "registry_app", "registry")):
        try:
            sub = getattr(__import__(f"recontrast_core.{module}", fromlist=[attr]), attr)
        except ImportError as exc:
            app.command(name, help=f"(unavailable: install recontrast[pipeline]; {exc})")(_unavailable(str(exc)))
            continue
        app.add_typer(sub, name=name)
    try:
        from .demo import demo_command

        app.command("demo", help="Run the whole pipeline locally on real data with embedded defaults.")(demo_command)
    except ImportError:
        pass


_mount_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
