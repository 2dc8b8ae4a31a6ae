"""The ``recontrast`` command: train | evaluate | predict | adapt | data | pipeline | registry | demo.

Human output (progress bars, tables, errors) goes to stderr; ``--json`` prints one
machine-readable document on stdout. Bad input exits with code 2 and one line.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

from .common import (
    console,
    emit_json,
    layout_option,
    layout_options,
    params_option,
    read_validated_dataset,
    set_option,
    settings_from,
    summary_table,
    user_errors,
)

app = typer.Typer(
    name="recontrast",
    help="ReContrast visual anomaly detection: from normal images to a registered, calibrated detector.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatasetArg = typer.Argument(..., help="MVTec-layout folder, a normal-images folder (with --layout folder), a LabelMe "
                                      "folder, a COCO or VisA dataset (--layout coco|visa), or a manifest.json")
LAYOUT_HELP = "auto | mvtec | folder | labelme | coco | visa | manifest (docs/data.md)"


def read_dataset_arg(dataset: Path, layout: str, abnormal_dir: Optional[Path], mask_dir: Optional[Path], progress: bool,
                     *, normal_label: Optional[str] = None, annotations: Optional[Path] = None,
                     images: Optional[Path] = None, split_csv: Optional[Path] = None,
                     options: Optional[list[str]] = None, allow_duplicates: bool = False):
    """Read and validate a dataset before any work; raises UserError naming the bad file."""
    opts = layout_options(layout, abnormal_dir=abnormal_dir, mask_dir=mask_dir, normal_label=normal_label,
                          annotations=annotations, images=images, split_csv=split_csv, items=options)
    return read_validated_dataset(dataset, layout, progress, allow_duplicates=allow_duplicates, **opts)


def _layout_flags():
    """The layout options train and evaluate share (docs/data.md)."""
    return dict(
        normal_label=typer.Option(None, "--normal-label", help="labelme/coco: label of 'ok' regions (not anomalies)"),
        annotations=typer.Option(None, "--annotations", help="coco: the instances .json file"),
        images=typer.Option(None, "--images", help="coco: the image folder (default: DATASET)"),
        split_csv=typer.Option(None, "--split-csv", help="visa: the split CSV"),
        allow_duplicates=typer.Option(None, "--allow-duplicates/--no-allow-duplicates",
                                      help="Identical images in train and test: a warning instead of an error"),
    )


_LF = _layout_flags()


@app.command()
def train(
    dataset: Path = DatasetArg,
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Output folder (checkpoints/, bundle/)"),
    config: Optional[Path] = params_option(),
    backbone: Optional[str] = typer.Option(None, help="tf_efficientnet_lite0 (offline default), -lite1, -lite2, wide_resnet50_2, resnet18, or any timm name"),
    weights: Optional[str] = typer.Option(None, help="'imagenet', 'none', or a local/s3:// state_dict"),
    feature_location: Optional[str] = typer.Option(None, help="auto | bottleneck | expansion"),
    input_stats: Optional[str] = typer.Option(None, help="auto (the weights' own) | imagenet | unit ([-1, 1])"),
    image_size: Optional[int] = typer.Option(None, help="Square input size, a multiple of 32 (paper: 256)"),
    iterations: Optional[int] = typer.Option(None, help="Training iterations (paper: 2000)"),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (paper: 16)"),
    encoder_bn: Optional[str] = typer.Option(None, help="train (default) | eval: encoder BatchNorm mode"),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    checkpoint_every: Optional[int] = typer.Option(None),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Flip/jitter augmentation (on by default with --shots)"),
    shots: Optional[int] = typer.Option(None, "--shots", "-k", help="Few-shot ReContrast: train on K normal images (the adapt step's deterministic choice); all K train"),
    init_encoder: Optional[str] = typer.Option(None, help="Adapted encoder weights (from `recontrast adapt`) for both encoder copies"),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints/last.pt"),
    layout: str = typer.Option("auto", help=LAYOUT_HELP),
    abnormal_dir: Optional[Path] = typer.Option(None, help="folder layout: anomalous test images"),
    mask_dir: Optional[Path] = typer.Option(None, help="folder layout: masks for anomalous images"),
    normal_label: Optional[str] = _LF["normal_label"],
    annotations: Optional[Path] = _LF["annotations"],
    images: Optional[Path] = _LF["images"],
    split_csv: Optional[Path] = _LF["split_csv"],
    layout_opt: list[str] = layout_option(),
    allow_duplicates: Optional[bool] = _LF["allow_duplicates"],
    validation_fraction: Optional[float] = typer.Option(None, help="Share of normal train images held out to set the threshold"),
    target_fpr: Optional[float] = typer.Option(None, help="False-positive rate the threshold aims at on held-out normals"),
    kind: Optional[str] = typer.Option(None, "--kind", help="model.kind: auto (default: the best of the three on "
                                       "the validation split) | recontrast | patchknn | fused"),
    set_: list[str] = set_option(),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train (or fit) a detector on the normal training images of DATASET (the pipeline's
    train step: same settings, same bundle). ``model.kind`` says which: ReContrast, the
    training-free patch-kNN, their fusion, or ``auto`` (all three, the best on the
    validation split kept; docs/model_kinds.md). On several GPUs: ``torchrun --nproc-per-node N
    -m recontrast_core.cli train ...`` (docs/distributed.md); rank 0 prints and writes."""
    with user_errors():
        from ..distributed import is_main_process
        from ..runtime import read_json
        from ..steps import train as train_step

        main_process = is_main_process()
        progress = progress and main_process

        settings = settings_from(config, {
            "train.backbone.name": backbone, "train.backbone.weights": weights,
            "train.backbone.feature_location": feature_location, "train.backbone.input_stats": input_stats,
            "train.image_size": image_size, "train.iterations": iterations, "train.batch_size": batch_size,
            "train.encoder_bn": encoder_bn, "train.seed": seed, "train.device": device,
            "train.checkpoint_every": checkpoint_every, "train.augment": augment, "shots": shots,
            "calibration.validation_fraction": validation_fraction, "calibration.target_fpr": target_fpr,
            "data.allow_duplicates": allow_duplicates, "model.kind": kind,
        }, set_)
        manifest = read_dataset_arg(dataset, layout, abnormal_dir, mask_dir, progress, normal_label=normal_label,
                                    annotations=annotations, images=images, split_csv=split_csv, options=layout_opt,
                                    allow_duplicates=settings.data.allow_duplicates)
        bundle = train_step(manifest, out, settings, init_encoder=init_encoder, resume=resume, progress=progress)
        if not main_process:
            return
        meta = read_json(bundle / "bundle.json") or {}
        info = meta.get("training", {})
        summary = {
            "bundle": str(bundle),
            "model_kind": meta.get("model_kind", "recontrast"),
            "iterations": info.get("iterations"),
            "final_loss": info.get("final_loss"),
            "wall_time_s": info.get("wall_time_s"),
            "train_images_per_s": info.get("images_per_s"),
            "train_images": info.get("n_train_images"),
        }
        summary["fit_wall_time_s"] = info.get("fit_wall_time_s")
        console.print(summary_table("training", {k: v for k, v in summary.items() if v is not None}))
        if meta.get("selection"):
            console.print(selection_table(meta["selection"]))
        if json_out:
            emit_json({**summary, "history": info.get("history", []), "selection": meta.get("selection")})


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="Model bundle folder (from `recontrast train`)"),
    dataset: Path = DatasetArg,
    out: Path = typer.Option(Path("runs/evaluate"), "--out", "-o", help="metrics.json, scores.csv and plots/ go here"),
    config: Optional[Path] = params_option(),
    layout: str = typer.Option("auto", help=LAYOUT_HELP),
    abnormal_dir: Optional[Path] = typer.Option(None),
    mask_dir: Optional[Path] = typer.Option(None),
    normal_label: Optional[str] = _LF["normal_label"],
    annotations: Optional[Path] = _LF["annotations"],
    images: Optional[Path] = _LF["images"],
    split_csv: Optional[Path] = _LF["split_csv"],
    layout_opt: list[str] = layout_option(),
    allow_duplicates: Optional[bool] = _LF["allow_duplicates"],
    device: str = typer.Option("auto"),
    baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline",
                                            help="Score the training-free baseline beside the model (default on)"),
    set_: list[str] = set_option(),
    json_out: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Image AUROC, pixel AUROC, AUPRO (and the paper's per-image AUPRO), F1-max on the test
    split, beside the training-free baseline (the pipeline's evaluate step). With normal
    test images only: the false-positive rate at the threshold, the score distribution and
    an AUROC on synthesised anomalies."""
    with user_errors():
        from ..runtime import read_json
        from ..steps import evaluate as evaluate_step

        settings = settings_from(config, {"baseline.enabled": baseline, "data.allow_duplicates": allow_duplicates}, set_)
        manifest = read_dataset_arg(dataset, layout, abnormal_dir, mask_dir, progress, normal_label=normal_label,
                                    annotations=annotations, images=images, split_csv=split_csv, options=layout_opt,
                                    allow_duplicates=settings.data.allow_duplicates)
        path = evaluate_step(bundle, manifest, out, settings, device=device, progress=progress)
        payload = read_json(path)
        metrics = payload["metrics"]
        model_rows = {k: v for k, v in metrics.items() if not k.startswith("baseline_")}
        kind = (payload.get("model") or {}).get("kind", "recontrast")
        console.print(summary_table(f"evaluation: {kind} ({payload['n_images']} test images)", model_rows))
        split = payload.get("evaluation_split") or {}
        if split.get("note"):
            console.print(f"[dim]split:[/] {split['note']}", highlight=False, soft_wrap=True)
        op = payload.get("operating_point") or {}
        if op:
            target = f"target FPR {op['target_fpr']:g} " if op.get("target_fpr") is not None else ""
            console.print(f"[dim]operating point:[/] threshold {op['threshold']:.6g} ({op['method']} rule, {target}"
                          f"on {op['n_calibration_normals']} held-out normals): recall "
                          f"{metrics.get('recall_at_threshold', float('nan')):.3f}, FPR "
                          f"{metrics.get('fpr_at_threshold', float('nan')):.3f}", highlight=False, soft_wrap=True)
        selection = (payload.get("model") or {}).get("selection")
        if selection:
            console.print(selection_table(selection))
        if payload.get("note"):
            console.print(f"[yellow]note:[/] {payload['note']}", highlight=False, soft_wrap=True)
        if "baseline" in payload:
            console.print(comparison_table(metrics))
        if json_out:
            emit_json({k: v for k, v in payload.items() if k != "per_image"})


def selection_table(selection: dict):
    """``model.kind: auto``: each candidate's validation metrics and the chosen kind."""
    from rich.table import Table

    v = selection.get("validation") or {}
    table = Table(title=f"model kinds on the validation split ({v.get('source', '?')}, {v.get('n_images', '?')} "
                        f"images); chosen: {selection.get('chosen')}", header_style="bold")
    from ..metrics import RANK_METRICS

    for col in ("kind", *RANK_METRICS):
        table.add_column(col, justify="right" if col != "kind" else "left")
    for name, m in (selection.get("candidates") or {}).items():
        mark = " *" if name == selection.get("chosen") else ""
        table.add_row(name + mark, *(f"{m[k]:.4f}" if k in m else "-" for k in RANK_METRICS))
    best = selection.get("best_training_free") or {}
    notes = []
    if best:
        notes.append(f"patchknn setting (best of {len(selection.get('grid') or [])} on the grid): "
                     f"{best.get('backbone')} {best.get('image_size')} px, input statistics {best.get('input_stats')}")
    fis = selection.get("fused_image_score") or {}
    if fis:
        notes.append(f"fused image score from {fis.get('chosen')} (validation image AUROC "
                     + ", ".join(f"{k} {v:.4f}" for k, v in (fis.get("image_auroc") or {}).items()) + ")")
    if notes:
        table.caption = "\n".join(notes)
    return table


def comparison_table(metrics: dict):
    """Model against the training-free baseline, metric by metric."""
    from rich.table import Table

    table = Table(title="model vs training-free baseline (same test images)", header_style="bold")
    for col in ("metric", "model", "baseline", "delta"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    from ..metrics import REPORTED_METRICS

    for key in REPORTED_METRICS:
        if key in metrics and f"baseline_{key}" in metrics:
            m, b = metrics[key], metrics[f"baseline_{key}"]
            colour = "green" if m >= b else "red"
            table.add_row(key, f"{m:.4f}", f"{b:.4f}", f"[{colour}]{m - b:+.4f}[/]")
    return table


EXIT_SOME_FAILED = 3  # finished, but some images could not be read (listed in results.csv)


@app.command()
def predict(
    args: list[str] = typer.Argument(..., metavar="[BUNDLE] INPUTS...",
                                     help="A bundle folder, then image files or folders; with --model only the "
                                          "inputs, which may also be s3://bucket/prefix/"),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Bundle folder, s3:// bundle, models:/NAME@ALIAS, models:/NAME/VERSION "
                                             "or runs:/RUN_ID/PATH (docs/batch_scoring.md)"),
    out: str = typer.Option("runs/predict", "--out", "-o",
                            help="Folder or s3://bucket/prefix/ for the results table and overlays"),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays"),
    device: str = typer.Option("auto"),
    chunk_size: int = typer.Option(64, "--chunk-size", help="Batch scoring: images per committed part"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow server for models:/ and runs:/ URIs"),
    json_out: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score new images: score, normalised score (0.5 = threshold) and decision per image.
    Unreadable images are listed in the results with the reason; then the exit code is 3.

    A local bundle and local files: results.csv and overlays/ (--json: the rows).

    A models:/, runs:/ or s3:// model, or an s3:// input or output:
    restart-safe batch scoring to results.parquet + results.csv
    (--json: a summary; docs/batch_scoring.md)."""
    with user_errors():
        from ..errors import UserError

        model_ref, inputs = (model, args) if model else (args[0], args[1:])
        if not inputs:
            raise UserError("give the model (a bundle folder, or --model URI) and at least one image file or folder")
        if any(str(x).startswith("s3://") for x in [out, *inputs]) or model_ref.startswith(("models:/", "runs:/", "s3://")):
            _batch_predict(model_ref, inputs, out, overlays, device, chunk_size, tracking_uri, json_out, progress)
            return
        from ..predict import failed_rows, predict_paths

        rows = predict_paths(model_ref, inputs, Path(out), overlays=overlays, device=device, progress=progress)
        failed = failed_rows(rows)
        flagged = sum(bool(r["decision"]) for r in rows)
        console.print(summary_table("prediction", {"images": len(rows), "anomalous": flagged, "unreadable": len(failed),
                                                   "results": str(Path(out) / "results.csv")}))
        for r in failed:
            console.print(f"[yellow]unreadable:[/] {r['path']}: {r['error']}", highlight=False, soft_wrap=True)
        if json_out:
            emit_json(rows)
        if failed:
            raise typer.Exit(EXIT_SOME_FAILED)


def _batch_predict(model_ref, inputs, out, overlays, device, chunk_size, tracking_uri, json_out, progress) -> None:
    """``predict`` through :mod:`recontrast_core.mlops.batch_scoring` (restart-safe parts)."""
    from ..errors import UserError

    try:
        import boto3  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise UserError(f"batch scoring needs the pipeline extra (pip install 'recontrast[pipeline]'): {exc}") from None
    from ..mlops.batch_scoring import run_batch_scoring

    summary = run_batch_scoring(model_ref, inputs, out, chunk_size=chunk_size, overlays=overlays, device=device,
                                progress=progress, tracking_uri=tracking_uri)
    console.print(summary_table("batch scoring", {k: v for k, v in summary.items() if k != "failed"}))
    for r in summary["failed"]:
        console.print(f"[yellow]unreadable:[/] {r['path']}: {r['error']}", highlight=False, soft_wrap=True)
    if json_out:
        emit_json(summary)
    if summary["unreadable"]:
        raise typer.Exit(EXIT_SOME_FAILED)


def _unavailable(name: str, exc: ImportError, extra: str = "pipeline"):
    """A placeholder that says why the command cannot run, instead of vanishing."""
    reason = f"{type(exc).__name__}: {exc}"

    def command() -> None:
        console.print(f"[bold red]error:[/] `recontrast {name}` needs the {extra} extra "
                      f"(pip install 'recontrast\\[{extra}]'): {reason}", highlight=False)
        raise typer.Exit(2)

    return command


def _mount() -> None:
    """Sub-commands in their own modules; one whose dependencies are missing stays listed
    and explains itself (exit 2) rather than disappearing."""
    from .adapt import adapt_command
    from .data import data_app

    app.command("adapt", help="Contrastive domain adaptation of the encoder: MSC or COFT-AD few-shot.")(adapt_command)
    app.add_typer(data_app, name="data")
    app.command("export", help="Export the whole scoring graph to ONNX or OpenVINO.")(importlib.import_module("recontrast_core.cli.export").export_command)
    app.command("recalibrate", help="A new threshold from new normal images (same weights), registered through the gate.")(importlib.import_module("recontrast_core.cli.recalibrate").recalibrate_command)
    app.command("monitor", help="Drift of a deployed model's scores (and images) against its reference: ok, watch or retrain.")(importlib.import_module("recontrast_core.cli.monitor").monitor_command)
    for module, attr, name in (("pipeline", "pipeline_app", "pipeline"), ("registry", "registry_app", "registry"),
                               ("review", "review_app", "review")):
        try:
            sub = getattr(importlib.import_module(f"recontrast_core.cli.{module}"), attr)
        except ImportError as exc:
            app.command(name, help=f"(unavailable: install recontrast\\[pipeline]; {exc})")(_unavailable(name, exc))
            continue
        app.add_typer(sub, name=name)
    try:
        from .demo import demo_command
    except ImportError as exc:
        app.command("demo", help=f"(unavailable: install recontrast\\[pipeline]; {exc})")(_unavailable("demo", exc))
    else:
        app.command("demo", help="Run the whole pipeline locally on real data with embedded defaults.")(demo_command)
    try:
        from .serve import serve_command
    except ImportError as exc:
        app.command("serve", help=f"(unavailable: install recontrast\\[serve]; {exc})",  # says so whatever the flags
                    context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
            _unavailable("serve", exc, "serve,pipeline"))
    else:
        app.command("serve", help="Serve a registered model over KServe's v2 protocol; reload when the alias moves.")(
            serve_command)


_mount()


def main() -> None:
    from ..runtime import configure_threads

    configure_threads()  # the CPU quota (a pod's limit), unless OMP_NUM_THREADS says otherwise
    app()


if __name__ == "__main__":
    main()
