"""evaluate: the bundle (and the training-free baseline beside it) on the test split ->
``metrics.json``, ``metrics_summary.json``, ``scores.csv``, ``plots/``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..bundle import load_detector
from ..config import PipelineConfig
from ..data.manifest import Manifest
from ..errors import UserError
from ..evaluate import evaluate_bundle
from ..plots import manifest_masks, overlay_grid, plot_roc_pr
from ..runtime import atomic_write_json, ensure_output_dir, require_complete, step_outputs
from .artifacts import (METRICS_FILE, METRICS_SUMMARY_FILE, PLOTS_DIR, PathLike, find_bundle_dir, load_manifest,
                        select_shots)
from .records import DvcStage, Port, StepRecord, component_run_id, register_step
from .tracked import log_artifacts, step_tracking


def evaluate(
    bundle_dir: PathLike,
    manifest: Union[PathLike, Manifest],
    out_dir: PathLike,
    settings: PipelineConfig = PipelineConfig(),
    *,
    device: Optional[str] = None,
    overlay_images: int = 8,
    pipeline_run_id: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Evaluate the bundle on the manifest's test split; returns ``metrics.json``.

    Also writes ``metrics_summary.json`` (scalars only), ``scores.csv``, ``plots/roc.png``,
    ``plots/pr.png`` and ``plots/overlay_grid.png`` (the ``overlay_images`` highest-scoring
    anomalous and normal test images with their calibrated maps; 0 = none). ``device``
    defaults to ``settings.train.device``; the baseline follows ``settings.baseline``.
    """
    out = ensure_output_dir(out_dir)
    bundle = find_bundle_dir(bundle_dir)
    rows = load_manifest(manifest)
    test = rows.select(split="test")
    if len(test) == 0:
        raise UserError(f"{rows.root}: no test images to evaluate on")
    device = device or settings.train.device
    require_complete(Path(bundle_dir), "train")
    with step_outputs(out, "evaluate"), \
            step_tracking("evaluate", pipeline_run_id, settings.tracking,
                          params={"device": device, "n_test_images": len(test), "baseline": settings.baseline}) as run_id:
        detector = load_detector(bundle, device)
        # few-shot: the baseline's bank holds the same shots as the model's training set
        payload = evaluate_bundle(detector, rows, out_dir=out, progress=progress, device=device,
                                  keep_maps=overlay_images > 0, baseline=settings.baseline,
                                  baseline_train=select_shots(rows, settings.shots) if settings.shots else None,
                                  model_settings=settings.model)
        maps, images = payload.pop("_maps", None), payload.pop("_images", None)
        atomic_write_json(out / METRICS_SUMMARY_FILE, {
            k: v for k, v in payload["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        })
        per_image = payload["per_image"]
        plot_roc_pr([r["label"] for r in per_image], [r["score"] for r in per_image], out / PLOTS_DIR)
        if maps is not None and images is not None:
            overlay_grid(per_image, images, maps, detector.calibration, out / PLOTS_DIR / "overlay_grid.png",
                         n=overlay_images, masks=manifest_masks(rows, per_image, maps.shape[-1]))
        if run_id is not None:
            from ..mlops import tracking as mlflow_tracking

            mlflow_tracking.log_evaluation(payload, run_id, plots_dir=out / PLOTS_DIR)
            log_artifacts(run_id, out / "scores.csv", "evaluation", settings.tracking)
    return out / METRICS_FILE


# ----------------------------------------------------------------------------- its record
SUMMARY_OUT = "artifacts/evaluate_metrics.json"  # the scalars again, for `dvc metrics show`


def _cli(args, settings: PipelineConfig, progress: bool, pipeline_run_id: Optional[str]) -> Path:
    import shutil

    result = evaluate(args.bundle, args.manifest, args.out, settings, pipeline_run_id=pipeline_run_id,
                      progress=progress)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.out) / METRICS_SUMMARY_FILE, args.summary)
    return result


def _component(v: dict) -> tuple:
    import math

    from ..runtime import read_json

    report, metrics = v["report"], v["metrics"]
    path = evaluate(v["bundle"].path, v["dataset"].path, report.path, PipelineConfig.model_validate(v["settings"]),
                    pipeline_run_id=component_run_id(v), progress=False)
    payload = read_json(path)
    scalars = {k: float(x) for k, x in payload["metrics"].items()
               if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)}
    for key, value in scalars.items():
        metrics.log_metric(key, value)
    report.metadata["dataset_fingerprint"] = payload.get("dataset_fingerprint") or ""
    return scalars.get("image_auroc", float("nan")), scalars.get("pixel_auroc", float("nan"))


RECORD = register_step(StepRecord(
    name="evaluate",
    summary="``report``: folder with metrics.json (+ scores.csv, plots/); ``metrics``: the scalars.",
    run=evaluate, sections=("baseline", "model", "shots", "calibration", "train.device", "tracking"),
    cli=_cli, component=_component,
    inputs=(Port("bundle", "Model", flag="bundle", dvc_path="artifacts/train"),
            Port("dataset", "Dataset", flag="manifest", dvc_path="artifacts/ingest")),
    outputs=(Port("report", "Artifact"), Port("metrics", "Metrics")),
    returns=(("image_auroc", float), ("pixel_auroc", float)),
    dvc=DvcStage(out="artifacts/evaluate", extra_args=f"--summary {SUMMARY_OUT}", metrics=(SUMMARY_OUT,)),
))
