"""The batch-scoring pipeline: its compiled YAML against the golden file, its cluster
settings, and submitting / scheduling it through ``kfp.Client`` against the recording KFP
API stub of ``test_pipeline_client.py`` (what a real server would receive).

Regenerate the golden file after an intended change with::

    env -u RECONTRAST_IMAGE python -m recontrast_core.pipelines.batch_scoring
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from recontrast_core.pipelines.client import schedule, submit
from tests.unit.test_pipeline_client import _only, kfp_server  # noqa: F401  (the stub server fixture)

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "pipelines" / "compiled" / "batch_scoring.yaml"
FAKE_SECRET = "fake-secret-" + uuid.uuid4().hex

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:This client only works:FutureWarning"),
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kfp") / "batch_scoring.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RECONTRAST_IMAGE"}
    env.update({"AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "MLFLOW_TRACKING_PASSWORD": FAKE_SECRET, "PYTHONPATH": str(REPO)})
    code = "import sys; from recontrast_core.pipelines.batch_scoring import compile_pipeline; compile_pipeline(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, env=env, check=True, timeout=240)
    return out


def _normalise(text: str) -> list:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for d in docs:
        d.pop("sdkVersion", None)
    return docs


def test_compiled_batch_pipeline_matches_golden(compiled: Path) -> None:
    assert _normalise(compiled.read_text()) == _normalise(GOLDEN.read_text()), (
        "the compiled pipeline differs from pipelines/compiled/batch_scoring.yaml; if intended, regenerate it: "
        "env -u RECONTRAST_IMAGE python -m recontrast_core.pipelines.batch_scoring"
    )
    assert FAKE_SECRET not in compiled.read_text()


def test_batch_task_gets_credentials_retries_and_no_cache(compiled: Path) -> None:
    spec, platform = list(yaml.safe_load_all(compiled.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"model_uri", "input_uri", "output_uri", "chunk_size", "device", "run_subfolder"} == set(params)
    assert params["model_uri"]["defaultValue"] == "models:/recontrast@champion"
    task = spec["root"]["dag"]["tasks"]["batch-score-op"]
    assert task["retryPolicy"]["maxRetryCount"] == 3  # a retried task resumes from its parts
    assert not task["cachingOptions"].get("enableCache")  # inputs and aliases change outside KFP
    assert task["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-batch-score-op"]
    secrets = {s["secretName"]: s for s in k8s["secretAsEnv"]}
    assert {e["envVar"] for e in secrets["recontrast-s3"]["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "recontrast-mlflow" in secrets and k8s["configMapAsEnv"][0]["configMapName"] == "recontrast-config"


def test_submit_and_schedule_the_batch_pipeline(kfp_server) -> None:  # noqa: F811
    host, stub = kfp_server()
    params = {"input_uri": "s3://plant/incoming/", "output_uri": "s3://plant/scores/", "chunk_size": None}
    result = submit(host, params, package_path=str(GOLDEN), pipeline="batch-scoring")
    run = json.loads(_only(stub, "POST", "/apis/v2beta1/runs")["body"])
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "recontrast-batch-scoring"
    assert run["runtime_config"]["parameters"] == {"input_uri": "s3://plant/incoming/", "output_uri": "s3://plant/scores/"}
    assert run["display_name"].startswith("recontrast-batch-scoring-") and result["run_id"] == "run-1"

    result = schedule(host, "0 2 * * *", params, pipeline="batch-scoring")  # compiled on the spot
    upload = _only(stub, "POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["recontrast-batch-scoring"] and b"batch_score_op" in upload["body"]
    rr = json.loads(_only(stub, "POST", "/apis/v2beta1/recurringruns")["body"])
    assert rr["display_name"] == "recontrast-batch-scoring"
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert int(rr["max_concurrency"]) == 1 and rr["no_catchup"] is True
    assert rr["runtime_config"]["parameters"] == {"input_uri": "s3://plant/incoming/", "output_uri": "s3://plant/scores/"}
    assert result["recurring_run_id"] == "rr-1"


def test_cli_schedules_a_recurring_batch_scoring(kfp_server) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from recontrast_core.cli.pipeline import pipeline_app

    host, stub = kfp_server()
    res = CliRunner().invoke(pipeline_app, [
        "batch-scoring", "schedule", "--host", host, "--cron", "30 1 * * *", "--model", "models:/tiles@champion",
        "--input", "s3://plant/incoming/", "--output", "s3://plant/scores/", "--same-folder",
        "--package", str(GOLDEN), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["cron"] == "0 30 1 * * *"
    rr = json.loads(_only(stub, "POST", "/apis/v2beta1/recurringruns")["body"])
    assert rr["runtime_config"]["parameters"] == {
        "input_uri": "s3://plant/incoming/", "output_uri": "s3://plant/scores/", "model_uri": "models:/tiles@champion",
        "chunk_size": 256, "device": "auto", "run_subfolder": False}
    res = CliRunner().invoke(pipeline_app, ["batch-scoring", "submit", "--host", host, "--input", "s3://a/",
                                            "--output", "s3://b/", "--chunk-size", "0"])
    assert res.exit_code == 2 and "--chunk-size must be at least 1" in res.output


def test_unknown_pipeline_is_refused() -> None:
    from recontrast_core.errors import UserError

    with pytest.raises(UserError, match="unknown pipeline 'scoring'"):
        submit("http://127.0.0.1:9", {}, pipeline="scoring")
