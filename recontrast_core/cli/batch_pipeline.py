"""``recontrast pipeline batch-scoring compile | run --local | submit | schedule``: the
batch-scoring pipeline (:mod:`recontrast_core.pipelines.batch_scoring`), with the verbs of the training
pipeline's commands. ``recontrast predict`` runs the same scoring without KFP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import console, emit_json, summary_table, user_errors

batch_app = typer.Typer(
    name="batch-scoring",
    help="The batch-scoring pipeline (images under an s3:// prefix -> results table + overlays): "
    "compile, run locally, submit or schedule on Kubeflow Pipelines.",
    no_args_is_help=True,
)

Input = typer.Option(..., "--input", help="s3://bucket/prefix/ (or a folder the pod sees) with the images.")
Output = typer.Option(..., "--output", help="s3://bucket/prefix/ for parts/, overlays/, results.parquet, results.csv.")
Model = typer.Option("models:/recontrast@champion", "--model",
                     help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or an s3:// bundle.")
ChunkSize = typer.Option(256, "--chunk-size", help="Images per committed part.")
Device = typer.Option("auto", "--device", help="auto | cpu | cuda")
RunSubfolder = typer.Option(True, "--run-subfolder/--same-folder",
                            help="Results in OUTPUT/<KFP run id>/ (default), or in OUTPUT itself: then each run "
                                 "scores only the images not already there.")
Host = typer.Option(..., "--host", envvar="KFP_HOST", help="Kubeflow Pipelines API URL.")
Namespace = typer.Option(None, "--namespace", help="KFP namespace (multi-user deployments).")
Package = typer.Option(None, "--package", help="A compiled pipeline YAML (default: compile now).")
Experiment = typer.Option("recontrast", "--experiment", help="KFP experiment (created if missing).")
AsJson = typer.Option(False, "--json", help="Machine-readable output on stdout.")


def _arguments(input_uri: str, output_uri: str, model_uri: str, chunk_size: int, device: str,
               run_subfolder: bool) -> dict:
    from recontrast_core.pipelines.batch_scoring import pipeline_arguments

    if chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, not {chunk_size}")
    return pipeline_arguments(input_uri, output_uri, model_uri, chunk_size, device, run_subfolder)


def _show(title: str, result: dict, as_json: bool) -> None:
    emit_json(result) if as_json else console.print(summary_table(title, result))


@batch_app.command("compile")
def compile_cmd(
    output: Path = typer.Option(Path("batch_scoring.yaml"), "--output", "-o",
                                help="Where to write the YAML (golden file: pipelines/compiled/batch_scoring.yaml)."),
    as_json: bool = AsJson,
) -> None:
    """Compile the batch-scoring pipeline to KFP IR YAML (image: $RECONTRAST_IMAGE or the default)."""
    with user_errors():
        from recontrast_core.components import IMAGE
        from recontrast_core.pipelines.batch_scoring import compile_pipeline

        _show("compiled", {"path": str(compile_pipeline(output)), "image": IMAGE}, as_json)


@batch_app.command("run")
def run_cmd(
    local: bool = typer.Option(False, "--local", help="Run on this machine with KFP's local runner."),
    input_uri: str = Input, output_uri: str = Output, model_uri: str = Model, chunk_size: int = ChunkSize,
    device: str = Device, run_subfolder: bool = RunSubfolder,
    pipeline_root: Path = typer.Option(Path("runs/kfp-local"), "--pipeline-root"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Stream the full runner log."),
    as_json: bool = AsJson,
) -> None:
    """Run the pipeline locally (``--local``): the same component as on the cluster."""
    with user_errors():
        if not local:
            raise UserError("only --local runs here; use `recontrast pipeline batch-scoring submit --host URL`")
        from recontrast_core.pipelines.local_runner import run_local_batch_scoring

        args = _arguments(input_uri, output_uri, model_uri, chunk_size, device, run_subfolder)
        result = run_local_batch_scoring(args, pipeline_root, verbose=verbose)
        _show("batch scoring", result if as_json else {k: v for k, v in result.items() if k != "failed"}, as_json)


@batch_app.command("submit")
def submit_cmd(
    host: str = Host, input_uri: str = Input, output_uri: str = Output, model_uri: str = Model,
    chunk_size: int = ChunkSize, device: str = Device, run_subfolder: bool = RunSubfolder,
    experiment: str = Experiment, run_name: Optional[str] = typer.Option(None, "--run-name"),
    namespace: Optional[str] = Namespace, package: Optional[Path] = Package, as_json: bool = AsJson,
) -> None:
    """Submit one batch-scoring run to a Kubeflow Pipelines server."""
    with user_errors():
        from recontrast_core.pipelines.client import submit

        args = _arguments(input_uri, output_uri, model_uri, chunk_size, device, run_subfolder)
        _show("submitted", submit(host, args, experiment=experiment, run_name=run_name, namespace=namespace,
                                  package_path=str(package) if package else None, pipeline="batch-scoring"), as_json)


@batch_app.command("schedule")
def schedule_cmd(
    cron: str = typer.Option(..., "--cron", help="Cron expression (5 fields, or KFP's 6 with seconds)."),
    host: str = Host, input_uri: str = Input, output_uri: str = Output, model_uri: str = Model,
    chunk_size: int = ChunkSize, device: str = Device, run_subfolder: bool = RunSubfolder,
    job_name: str = typer.Option("recontrast-batch-scoring", "--job-name", help="Recurring run name."),
    experiment: str = Experiment, namespace: Optional[str] = Namespace, package: Optional[Path] = Package,
    as_json: bool = AsJson,
) -> None:
    """Schedule batch scoring: a KFP recurring run (one at a time, no catch-up)."""
    with user_errors():
        from recontrast_core.pipelines.client import schedule

        args = _arguments(input_uri, output_uri, model_uri, chunk_size, device, run_subfolder)
        _show("scheduled", schedule(host, cron, args, job_name=job_name, experiment=experiment, namespace=namespace,
                                    package_path=str(package) if package else None, pipeline="batch-scoring"), as_json)
