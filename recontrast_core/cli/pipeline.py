"""``recontrast pipeline compile | run --local | submit | schedule`` (the training pipeline)
and ``recontrast pipeline batch-scoring ...`` (:mod:`recontrast_core.cli.batch_pipeline`).
``recontrast demo`` is :func:`recontrast_core.cli.demo.demo_command`.

Settings: embedded defaults (:class:`~recontrast_core.config.PipelineConfig`), then
``--params params.yaml`` (the same file DVC uses), then the flags given, then ``--set
KEY=VALUE`` items: the one override function (``steps.settings.apply_overrides``).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import PipelineConfig
from ..errors import UserError
from .batch_pipeline import batch_app
from .monitor import monitor_pipeline_app
from .common import console, emit_json, set_option, settings_from, summary_table, user_errors

pipeline_app = typer.Typer(
    name="pipeline",
    help="The training pipeline (ingest -> adapt -> train -> evaluate -> register): "
    "compile for Kubeflow Pipelines, run locally, submit or schedule on a cluster.",
    no_args_is_help=True,
)
pipeline_app.add_typer(batch_app, name="batch-scoring")
pipeline_app.add_typer(monitor_pipeline_app, name="monitor")

Params = typer.Option(None, "--params", help="YAML with pipeline settings (PipelineConfig, e.g. params.yaml).")
Source = typer.Option(None, "--source", help="Dataset: folder, s3://bucket/prefix, or a path in --dvc-repo.")
DvcRepo = typer.Option(None, "--dvc-repo", help="DVC-tracked git repo (path or URL) holding --source.")
DvcRev = typer.Option(None, "--dvc-rev", help="Git revision of --dvc-repo.")
S3Endpoint = typer.Option(None, "--s3-endpoint-url",
                          help="S3/MinIO endpoint for s3:// sources (default: AWS_ENDPOINT_URL / "
                          "S3_ENDPOINT_URL); with --dvc-repo it overrides the DVC remote's endpointurl.")
AdaptMethod = typer.Option(None, "--adapt-method", help="none | msc | coft (adapt the encoder before training).")
Shots = typer.Option(None, "--shots", help="Few-shot: number of normal training images.")
Iterations = typer.Option(None, "--iterations", help="Training iterations.")
ImageSize = typer.Option(None, "--image-size", help="Training/evaluation image size (px).")
BatchSize = typer.Option(None, "--batch-size", help="Training batch size.")
Backbone = typer.Option(None, "--backbone", help="Encoder backbone (timm name).")
Device = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N")
ModelName = typer.Option(None, "--model-name", help="Registered model name.")
TrackingUri = typer.Option(
    None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking/registry URI (default: sqlite:///./mlflow.db).",
)
AsJson = typer.Option(False, "--json", help="Machine-readable output on stdout.")
Host = typer.Option(..., "--host", envvar="KFP_HOST", help="Kubeflow Pipelines API URL.")
Namespace = typer.Option(None, "--namespace", help="KFP namespace (multi-user deployments).")
Package = typer.Option(None, "--package", help="A compiled pipeline YAML (default: compile now).")
Experiment = typer.Option("recontrast", "--experiment", help="KFP experiment (created if missing).")


def build_pipeline_config(params: Optional[Path] = None, flags: Optional[dict] = None,
                          sets: Optional[list[str]] = None) -> PipelineConfig:
    """``params`` file (or defaults) + dotted flag overrides (None = keep) + ``--set`` items."""
    return settings_from(params, flags or {}, sets)


def _overrides(source, dvc_repo, dvc_rev, s3_endpoint_url, adapt_method, shots, iterations, image_size,
               batch_size, backbone, device, model_name, tracking_uri) -> dict:
    return {
        "data.source": source,
        "data.dvc_repo": dvc_repo,
        "data.dvc_rev": dvc_rev,
        "data.s3_endpoint_url": s3_endpoint_url,
        "adapt_method": adapt_method,
        "shots": shots,
        "train.iterations": iterations,
        "train.image_size": image_size,
        "train.batch_size": batch_size,
        "train.backbone.name": backbone,
        "train.device": device,
        "registry.model_name": model_name,
        "tracking.tracking_uri": tracking_uri,
    }


@pipeline_app.command("params")
def params_cmd(
    params: Optional[Path] = Params,
    set_: list[str] = set_option(),
) -> None:
    """Print the whole settings (a params.yaml: every field of PipelineConfig) after
    --params and --set; `recontrast pipeline params --set train.iterations=50 > params.yaml`."""
    with user_errors():
        import sys

        from ..steps.settings import dump_settings

        sys.stdout.write(dump_settings(build_pipeline_config(params, {}, set_)))


@pipeline_app.command("compile")
def compile_cmd(
    output: Path = typer.Option(
        Path("training_pipeline.yaml"), "--output", "-o",
        help="Where to write the KFP pipeline YAML (the committed golden file is "
        "pipelines/compiled/training_pipeline.yaml).",
    ),
    as_json: bool = AsJson,
) -> None:
    """Compile the training pipeline to KFP IR YAML (image: $RECONTRAST_IMAGE or the default)."""
    with user_errors():
        from recontrast_core.components import IMAGE
        from recontrast_core.pipelines.training_pipeline import compile_pipeline

        path = compile_pipeline(output)
        if as_json:
            emit_json({"path": str(path), "image": IMAGE})
        else:
            console.print(f"compiled [bold]{path}[/] (image {IMAGE})")


@pipeline_app.command("run")
def run_cmd(
    local: bool = typer.Option(False, "--local", help="Run on this machine with KFP's local runner."),
    params: Optional[Path] = Params,
    source: Optional[str] = Source,
    dvc_repo: Optional[str] = DvcRepo,
    dvc_rev: Optional[str] = DvcRev,
    s3_endpoint_url: Optional[str] = S3Endpoint,
    adapt_method: Optional[str] = AdaptMethod,
    shots: Optional[int] = Shots,
    iterations: Optional[int] = Iterations,
    image_size: Optional[int] = ImageSize,
    batch_size: Optional[int] = BatchSize,
    backbone: Optional[str] = Backbone,
    device: Optional[str] = Device,
    model_name: Optional[str] = ModelName,
    tracking_uri: Optional[str] = TrackingUri,
    set_: list[str] = set_option(),
    pipeline_root: Path = typer.Option(Path("runs/kfp-local"), "--pipeline-root",
                                       help="Where the local runner keeps step outputs."),
    pipeline_run_id: Optional[str] = typer.Option(None, "--pipeline-run-id",
                                                  help="MLflow/registry run id (default: a new one)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Stream the full runner log."),
    as_json: bool = AsJson,
) -> None:
    """Run the whole pipeline locally (``--local``): same components as on the cluster."""
    with user_errors():
        if not local:
            raise UserError("only --local runs here; use `recontrast pipeline submit --host URL` for a cluster")
        from recontrast_core.pipelines.local_runner import run_local
        from recontrast_core.pipelines.training_pipeline import pipeline_arguments

        cfg = build_pipeline_config(params, _overrides(
            source, dvc_repo, dvc_rev, s3_endpoint_url, adapt_method, shots, iterations, image_size, batch_size,
            backbone, device, model_name, tracking_uri), set_)
        run_id = pipeline_run_id or f"local-{uuid.uuid4().hex[:12]}"
        result = run_local(pipeline_arguments(cfg, run_id), pipeline_root, verbose=verbose)
        from ..mlops import tracking

        # UI links (tracking.ui_url): they open MLflow 3's classic runs view, not its GenAI one
        links = tracking.pipeline_links(
            result.get("pipeline_run_id") or run_id, experiment=cfg.tracking.experiment,
            tracking_uri=cfg.tracking.tracking_uri or None, model_name=result.get("model_name"),
            version=result.get("version"))
        if as_json:
            emit_json({**result, **links})
        else:
            console.print(summary_table("pipeline run", result))
            for key, url in links.items():  # one line each: a table cell would fold the URL
                console.print(f"{key}: {url}", soft_wrap=True)


def _cluster_arguments(params, overrides: dict, sets: list[str]) -> dict:
    """Pipeline parameters for a cluster run. A plain-folder source is copied into the
    ingest artifact there (the later steps run in other pods)."""
    from recontrast_core.pipelines.training_pipeline import pipeline_arguments

    cfg = build_pipeline_config(params, overrides, sets)
    if not cfg.data.dvc_repo and not cfg.data.source.startswith("s3://"):
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"copy_local": True})})
    return pipeline_arguments(cfg)


@pipeline_app.command("submit")
def submit_cmd(
    host: str = Host,
    params: Optional[Path] = Params,
    source: Optional[str] = Source,
    dvc_repo: Optional[str] = DvcRepo,
    dvc_rev: Optional[str] = DvcRev,
    s3_endpoint_url: Optional[str] = S3Endpoint,
    adapt_method: Optional[str] = AdaptMethod,
    shots: Optional[int] = Shots,
    iterations: Optional[int] = Iterations,
    image_size: Optional[int] = ImageSize,
    batch_size: Optional[int] = BatchSize,
    backbone: Optional[str] = Backbone,
    device: Optional[str] = Device,
    model_name: Optional[str] = ModelName,
    set_: list[str] = set_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow URI as seen from the cluster "
                                               "(default: the recontrast-config ConfigMap)."),
    experiment: str = Experiment,
    run_name: Optional[str] = typer.Option(None, "--run-name"),
    namespace: Optional[str] = Namespace,
    package: Optional[Path] = Package,
    no_cache: bool = typer.Option(False, "--no-cache", help="Disable KFP caching for this run."),
    as_json: bool = AsJson,
) -> None:
    """Submit one run to a Kubeflow Pipelines server."""
    with user_errors():
        from recontrast_core.pipelines.client import submit

        args = _cluster_arguments(params, _overrides(
            source, dvc_repo, dvc_rev, s3_endpoint_url, adapt_method, shots, iterations, image_size, batch_size,
            backbone, device, model_name, tracking_uri), set_)
        result = submit(host, args, experiment=experiment, run_name=run_name,
                        package_path=str(package) if package else None, namespace=namespace,
                        enable_caching=False if no_cache else None)
        emit_json(result) if as_json else console.print(summary_table("submitted", result))


@pipeline_app.command("schedule")
def schedule_cmd(
    cron: str = typer.Option(..., "--cron", help="Cron expression (5 fields, or KFP's 6 with seconds)."),
    host: str = Host,
    params: Optional[Path] = Params,
    source: Optional[str] = Source,
    dvc_repo: Optional[str] = DvcRepo,
    dvc_rev: Optional[str] = DvcRev,
    s3_endpoint_url: Optional[str] = S3Endpoint,
    adapt_method: Optional[str] = AdaptMethod,
    shots: Optional[int] = Shots,
    iterations: Optional[int] = Iterations,
    image_size: Optional[int] = ImageSize,
    batch_size: Optional[int] = BatchSize,
    backbone: Optional[str] = Backbone,
    device: Optional[str] = Device,
    model_name: Optional[str] = ModelName,
    set_: list[str] = set_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri"),
    job_name: Optional[str] = typer.Option(None, "--job-name", help="Recurring run name (default: recontrast-retrain, "
                                           "recontrast-<line>-retrain with a line)."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="KFP experiment (created if missing; default: "
                                             "recontrast, recontrast-<line> with a line)."),
    namespace: Optional[str] = Namespace,
    package: Optional[Path] = Package,
    as_json: bool = AsJson,
) -> None:
    """Schedule retraining: a KFP recurring run (one at a time, no catch-up)."""
    with user_errors():
        from recontrast_core.pipelines.client import schedule

        args = _cluster_arguments(params, _overrides(
            source, dvc_repo, dvc_rev, s3_endpoint_url, adapt_method, shots, iterations, image_size, batch_size,
            backbone, device, model_name, tracking_uri), set_)
        from ..config import line_names

        names = line_names((args.get("settings") or {}).get("line"))  # a product line names its schedule
        result = schedule(host, cron, args, job_name=job_name or names["schedule"],
                          experiment=experiment or names["experiment"],
                          package_path=str(package) if package else None, namespace=namespace)
        emit_json(result) if as_json else console.print(summary_table("scheduled", result))
