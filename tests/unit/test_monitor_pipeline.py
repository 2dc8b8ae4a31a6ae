"""The monitor pipeline: its compiled YAML against the golden file, its DAG (the submit task
behind ``retrain`` and the monitor's ``retrain`` output), and the retraining submission
through ``kfp.Client`` against the recording KFP API stub of ``test_pipeline_client.py``
(what a real server would receive), with the reason recorded in MLflow (a SQLite store).

Regenerate the golden file after an intended change with::

    env -u RECONTRAST_IMAGE python -m recontrast_core.pipelines.monitor_pipeline
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.test_pipeline_client import _only, kfp_server  # noqa: F401  (the stub server fixture)
from tests.unit.test_pipeline_compile import _without_settings_defaults

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "pipelines" / "compiled" / "monitor_pipeline.yaml"
TRAINING_GOLDEN = REPO / "pipelines" / "compiled" / "training_pipeline.yaml"

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:This client only works:FutureWarning"),
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kfp") / "monitor_pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RECONTRAST_IMAGE"}
    env["PYTHONPATH"] = str(REPO)
    code = "import sys; from recontrast_core.pipelines.monitor_pipeline import compile_pipeline; compile_pipeline(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, env=env, check=True, timeout=240)
    return out


def _normalise(text: str) -> list:
    """As the training pipeline's golden test: no sdkVersion, no ``settings`` default (a new
    setting changes only that)."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for d in docs:
        d.pop("sdkVersion", None)
    return [_without_settings_defaults(d) for d in docs]


def test_compiled_monitor_pipeline_matches_golden(compiled: Path) -> None:
    assert _normalise(compiled.read_text()) == _normalise(GOLDEN.read_text()), (
        "the compiled pipeline differs from pipelines/compiled/monitor_pipeline.yaml; if intended, regenerate it: "
        "env -u RECONTRAST_IMAGE python -m recontrast_core.pipelines.monitor_pipeline"
    )


def test_the_dag_submits_only_when_a_retraining_is_due(compiled: Path) -> None:
    spec, platform = list(yaml.safe_load_all(compiled.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"scores_uri", "model_uri", "images_uri", "window", "since", "settings", "retrain", "kfp_host",
            "experiment", "pipeline_run_id"} == set(params)
    assert params["model_uri"]["defaultValue"] == "models:/recontrast@champion"
    assert params["settings"]["defaultValue"]["monitor"]["retrain_after"] == 2
    tasks = spec["root"]["dag"]["tasks"]
    mon = tasks["monitor-op"]
    assert mon["retryPolicy"]["maxRetryCount"] == 3 and not mon["cachingOptions"].get("enableCache")
    assert mon["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    outer = tasks["condition-1"]
    assert outer["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--retrain'] == true"
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]["condition-2"]
    assert inner["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--monitor-op-retrain'] == true"
    sub = spec["components"]["comp-condition-2"]["dag"]["tasks"]["submit-retrain-op"]
    assert sub["inputs"]["parameters"]["reason"]["componentInputParameter"] == "pipelinechannel--monitor-op-reason"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-monitor-op", "exec-submit-retrain-op"):  # S3 and MLflow credentials as env
        assert {s["secretName"] for s in executors[name]["secretAsEnv"]} == {"recontrast-s3", "recontrast-mlflow"}


def test_the_retraining_is_submitted_with_its_reason(kfp_server, tmp_path) -> None:  # noqa: F811
    from mlflow import MlflowClient

    from recontrast_core.config import PipelineConfig
    from recontrast_core.mlops.tracking import find_pipeline_run
    from recontrast_core.pipelines.monitor_pipeline import submit_retraining

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    exp = client.create_experiment("recontrast-monitor")
    windows = [client.create_run(exp).info.run_id for _ in range(2)]
    cfg = PipelineConfig(data={"source": "s3://plant/tiles/"}, tracking={"tracking_uri": tracking},
                         monitor={"retrain_after": 2})
    host, stub = kfp_server()
    reason = "drift monitor: 2 consecutive retrain windows (w1, w2) for recontrast/3: input brightness drifted"
    out = json.loads(submit_retraining(cfg.model_dump(mode="json", exclude_none=True), reason, json.dumps(windows),
                                       host, "recontrast", "kfp-monitor-9", package_path=str(TRAINING_GOLDEN)))
    run = json.loads(_only(stub, "POST", "/apis/v2beta1/runs")["body"])
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "recontrast-training"
    args = run["runtime_config"]["parameters"]
    assert args["pipeline_run_id"] == "monitor-retrain-kfp-monitor-9" and args["source"] == "s3://plant/tiles/"
    assert args["settings"]["monitor"]["retrain_after"] == 2 and args["model_name"] == "recontrast"
    assert run["display_name"].startswith("recontrast-retrain-by-monitor-")
    assert out["run_id"] == "run-1" and out["marked"] == windows and out["reason"] == reason
    for rid in windows:  # the triggering windows no longer count
        tags = client.get_run(rid).data.tags
        assert tags["monitor.retrain_submitted"] == "run-1" and tags["monitor.retrain_reason"] == reason
    parent = find_pipeline_run("monitor-retrain-kfp-monitor-9", client=client)
    assert parent.data.tags["retrain.reason"] == reason and parent.data.tags["retrain.trigger"] == "monitor"
    assert parent.data.tags["retrain.kfp_run_id"] == "run-1"


def test_a_folder_source_is_copied_into_the_retraining() -> None:
    from recontrast_core.config import PipelineConfig
    from recontrast_core.pipelines.monitor_pipeline import training_arguments

    args = training_arguments(PipelineConfig(data={"source": "/data/tiles"}), "monitor-retrain-x")
    assert args["settings"]["data"]["copy_local"] is True and args["pipeline_run_id"] == "monitor-retrain-x"


def test_cli_schedules_the_monitor_pipeline(kfp_server, tmp_path) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from recontrast_core.cli.pipeline import pipeline_app

    host, stub = kfp_server()
    res = CliRunner().invoke(pipeline_app, [
        "monitor", "schedule", "--host", host, "--cron", "15 6 * * *", "--scores", "s3://plant/score-log/",
        "--images", "s3://plant/incoming/", "--window", "1d", "--since", "14d", "--set", "monitor.retrain_after=3",
        "--package", str(GOLDEN), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["cron"] == "0 15 6 * * *"
    assert _only(stub, "POST", "/apis/v2beta1/pipelines/upload")["query"]["name"] == ["recontrast-monitor"]
    rr = json.loads(_only(stub, "POST", "/apis/v2beta1/recurringruns")["body"])
    assert rr["display_name"] == "recontrast-monitor" and int(rr["max_concurrency"]) == 1 and rr["no_catchup"]
    p = rr["runtime_config"]["parameters"]
    assert (p["scores_uri"], p["images_uri"], p["window"], p["since"]) == (
        "s3://plant/score-log/", "s3://plant/incoming/", "1d", "14d")
    assert p["settings"]["monitor"]["retrain_after"] == 3 and p["settings"]["monitor"]["window"] == "1d"
    assert p["retrain"] is True and p["kfp_host"].startswith("http://ml-pipeline.kubeflow")
    res = CliRunner().invoke(pipeline_app, ["monitor", "submit", "--host", host, "--scores", "s3://a/",
                                            "--set", "monitor.retrain_after=0"])
    assert res.exit_code == 2 and "retrain_after" in res.output
