"""``recontrast monitor SCORES``: the drift monitor (docs/operations.md, "Monitor" and
"Verdicts"), and ``recontrast pipeline monitor compile | submit | schedule``: the monitor
pipeline (:mod:`recontrast_core.pipelines.monitor_pipeline`).

Exit codes of ``recontrast monitor``: the last window's verdict, 0 ``ok``, 10 ``watch``, 11
``retrain`` (:data:`recontrast_core.monitor.EXIT_CODES`); 2 for bad input (one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, emit_json, params_option, set_option, settings_from, summary_table, user_errors


def monitor_command(
    scores: str = typer.Argument(..., help="Score table: a batch-scoring output (folder or s3:// prefix with "
                                           "results.parquet or parts/), a score log (`recontrast serve "
                                           "--score-log`), or a .parquet/.csv file"),
    model: str = typer.Option("models:/recontrast@champion", "--model", "-m",
                              help="The model whose reference the scores are judged against: models:/NAME@ALIAS, "
                                   "models:/NAME/VERSION, runs:/..., a bundle folder or an s3:// bundle"),
    window: Optional[str] = typer.Option(None, "--window", help="all | a number of images (500) | a UTC duration "
                                                                "(30m, 6h, 1d, 1w); default: monitor.window"),
    since: Optional[str] = typer.Option(None, "--since", help="Only rows scored within this duration (e.g. 7d)"),
    images: Optional[str] = typer.Option(None, "--images", help="Folder or s3:// prefix with the scored images: "
                                                                "their brightness, contrast and size against "
                                                                "the training images'"),
    out: str = typer.Option("runs/monitor", "--out", "-o", help="Folder or s3:// prefix for monitor.json and "
                                                                 "monitor.png"),
    any_version: bool = typer.Option(False, "--any-version",
                                     help="Use rows scored by other model versions too (default: only --model's)"),
    config: Optional[Path] = params_option(),
    set_: list[str] = set_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow: the registry for models:/ and where the window runs go"),
    track: bool = typer.Option(True, "--track/--no-track", help="Log one MLflow run per window"),
    json_out: bool = typer.Option(False, "--json", help="Print the report on stdout"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Judge a deployed model's scores (and images) against its calibration's reference,
    window by window: alarm rate (Wilson interval), KS + PSI of the scores, input statistics.
    Verdict of the last window: ok (exit 0), watch (10) or retrain (11)."""
    with user_errors():
        from ..mlops.monitoring import run_monitor, summary_of

        settings = settings_from(config, {"monitor.window": window}, set_)
        report = run_monitor(model, scores, cfg=settings.monitor, since=since, images=images, out=out,
                             tracking_uri=tracking_uri or settings.tracking.tracking_uri, track=track,
                             any_version=any_version, progress=progress)
        console.print(summary_table(f"monitor: {report['verdict']}", summary_of(report)))
        for w in report["windows"][-10:]:
            colour = {"ok": "green", "watch": "yellow", "retrain": "red"}[w["verdict"]]
            reasons = "; ".join(w["reasons"]) or "no drift"
            console.print(f"[{colour}]{w['verdict']}[/] {w['label']} ({w['n']} images): {reasons}",
                          highlight=False, soft_wrap=True)
        if report.get("note"):
            console.print(f"[yellow]note:[/] {report['note']}", highlight=False, soft_wrap=True)
        if json_out:
            emit_json(report)
    raise typer.Exit(report["exit_code"])


# ---------------------------------------------------------------------------------------
# recontrast pipeline monitor compile | submit | schedule
# ---------------------------------------------------------------------------------------
monitor_pipeline_app = typer.Typer(
    name="monitor",
    help="The monitor pipeline (scores -> verdict; the training pipeline submitted after "
         "monitor.retrain_after consecutive retrain windows): compile, submit or schedule on Kubeflow Pipelines.",
    no_args_is_help=True,
)

Scores = typer.Option(..., "--scores", help="s3:// score log or batch-scoring output the pod reads.")
Model = typer.Option("models:/recontrast@champion", "--model", help="The model whose reference is used.")
Images = typer.Option("", "--images", help="s3:// prefix of the scored images (input statistics); empty: none.")
Window = typer.Option("", "--window", help="Window (empty: the settings' monitor.window), e.g. 1d.")
Since = typer.Option("", "--since", help="Only rows scored within this duration, e.g. 14d (empty: all).")
Retrain = typer.Option(True, "--retrain/--no-retrain", help="Submit the training pipeline when one is due.")
KfpInCluster = typer.Option(None, "--kfp-host-in-cluster",
                            help="The KFP API as the monitor pod reaches it (default: the in-cluster service).")
Host = typer.Option(..., "--host", envvar="KFP_HOST", help="Kubeflow Pipelines API URL.")
Namespace = typer.Option(None, "--namespace", help="KFP namespace (multi-user deployments).")
Package = typer.Option(None, "--package", help="A compiled pipeline YAML (default: compile now).")
Experiment = typer.Option("recontrast", "--experiment", help="KFP experiment (created if missing).")
AsJson = typer.Option(False, "--json", help="Machine-readable output on stdout.")


def _arguments(params, sets, scores, model, images, window, since, retrain, kfp_host_in_cluster, experiment) -> dict:
    from recontrast_core.pipelines.monitor_pipeline import IN_CLUSTER_KFP, pipeline_arguments

    cfg = settings_from(params, {"monitor.window": window or None}, sets)
    return pipeline_arguments(scores, model, images, window, since, cfg, retrain, kfp_host_in_cluster or IN_CLUSTER_KFP,
                              experiment)


def _show(title: str, result: dict, as_json: bool) -> None:
    emit_json(result) if as_json else console.print(summary_table(title, result))


@monitor_pipeline_app.command("compile")
def compile_cmd(
    output: Path = typer.Option(Path("monitor_pipeline.yaml"), "--output", "-o",
                                help="Where to write the YAML (golden file: pipelines/compiled/monitor_pipeline.yaml)."),
    as_json: bool = AsJson,
) -> None:
    """Compile the monitor pipeline to KFP IR YAML (image: $RECONTRAST_IMAGE or the default)."""
    with user_errors():
        from recontrast_core.components import IMAGE
        from recontrast_core.pipelines.monitor_pipeline import compile_pipeline

        _show("compiled", {"path": str(compile_pipeline(output)), "image": IMAGE}, as_json)


@monitor_pipeline_app.command("submit")
def submit_cmd(
    host: str = Host, scores: str = Scores, model: str = Model, images: str = Images, window: str = Window,
    since: str = Since, retrain: bool = Retrain, kfp_host_in_cluster: Optional[str] = KfpInCluster,
    params: Optional[Path] = params_option(), set_: list[str] = set_option(), experiment: str = Experiment,
    run_name: Optional[str] = typer.Option(None, "--run-name"), namespace: Optional[str] = Namespace,
    package: Optional[Path] = Package, as_json: bool = AsJson,
) -> None:
    """Submit one monitor run to a Kubeflow Pipelines server."""
    with user_errors():
        from recontrast_core.pipelines.client import submit

        args = _arguments(params, set_, scores, model, images, window, since, retrain, kfp_host_in_cluster, experiment)
        _show("submitted", submit(host, args, experiment=experiment, run_name=run_name, namespace=namespace,
                                  package_path=str(package) if package else None, pipeline="monitor"), as_json)


@monitor_pipeline_app.command("schedule")
def schedule_cmd(
    cron: str = typer.Option(..., "--cron", help="Cron expression (5 fields, or KFP's 6 with seconds)."),
    host: str = Host, scores: str = Scores, model: str = Model, images: str = Images, window: str = Window,
    since: str = Since, retrain: bool = Retrain, kfp_host_in_cluster: Optional[str] = KfpInCluster,
    params: Optional[Path] = params_option(), set_: list[str] = set_option(),
    job_name: str = typer.Option("recontrast-monitor", "--job-name", help="Recurring run name."),
    experiment: str = Experiment, namespace: Optional[str] = Namespace, package: Optional[Path] = Package,
    as_json: bool = AsJson,
) -> None:
    """Schedule the monitor: a KFP recurring run (one at a time, no catch-up)."""
    with user_errors():
        from recontrast_core.pipelines.client import schedule

        args = _arguments(params, set_, scores, model, images, window, since, retrain, kfp_host_in_cluster, experiment)
        _show("scheduled", schedule(host, cron, args, job_name=job_name, experiment=experiment, namespace=namespace,
                                    package_path=str(package) if package else None, pipeline="monitor"), as_json)
