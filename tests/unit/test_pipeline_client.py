"""``submit`` and ``schedule`` against a recording stub of the KFP v2beta1 REST API.

No Kubeflow Pipelines API server can run here (no Kubernetes, no Docker), so this is a
loopback stub: an ``http.server`` in a thread that records every request ``kfp.Client``
makes and answers with minimal valid v2beta1 JSON. The tests check what a real server
would receive: the experiment lookup/creation, the run creation with the compiled
pipeline spec and parameters, the pipeline upload, and the recurring run body (cron,
``max_concurrency`` 1, ``no_catchup`` true).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from recontrast_core.pipelines.client import schedule, submit

GOLDEN = Path(__file__).resolve().parents[2] / "pipelines" / "compiled" / "training_pipeline.yaml"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:This client only works:FutureWarning"),
]


class KfpStub:
    """State + recorded requests of the fake API server."""

    def __init__(self, existing_pipeline: bool = False, existing_experiment: bool = False):
        self.requests: list[dict] = []
        self.existing_pipeline = existing_pipeline
        self.existing_experiment = existing_experiment

    def respond(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        if path == "/apis/v2beta1/healthz":
            return 200, {"multi_user": False}
        if path == "/apis/v2beta1/experiments" and method == "GET":
            if self.existing_experiment:
                return 200, {"experiments": [{"experiment_id": "exp-0", "display_name": "recontrast"}],
                             "total_size": 1}
            return 200, {}
        if path == "/apis/v2beta1/experiments" and method == "POST":
            exp = json.loads(body)
            return 200, {"experiment_id": "exp-1", "display_name": exp["display_name"]}
        if path == "/apis/v2beta1/runs" and method == "POST":
            run = json.loads(body)
            return 200, {"run_id": "run-1", "display_name": run["display_name"],
                         "experiment_id": run.get("experiment_id"), "state": "PENDING"}
        if path == "/apis/v2beta1/pipelines" and method == "GET":
            if self.existing_pipeline:
                return 200, {"pipelines": [{"pipeline_id": "pl-0", "display_name": "recontrast-training"}],
                             "total_size": 1}
            return 200, {}
        if path == "/apis/v2beta1/pipelines/upload" and method == "POST":
            return 200, {"pipeline_id": "pl-1", "display_name": query.get("name", [""])[0]}
        if path == "/apis/v2beta1/pipelines/upload_version" and method == "POST":
            return 200, {"pipeline_id": query.get("pipelineid", [""])[0], "pipeline_version_id": "pv-2",
                         "display_name": query.get("name", [""])[0]}
        if path.startswith("/apis/v2beta1/pipelines/") and path.endswith("/versions") and method == "GET":
            return 200, {"pipeline_versions": [{"pipeline_id": "pl-1", "pipeline_version_id": "pv-1"}],
                         "total_size": 1}
        if path == "/apis/v2beta1/recurringruns" and method == "POST":
            rr = json.loads(body)
            return 200, {"recurring_run_id": "rr-1", "display_name": rr["display_name"], "status": "ENABLED"}
        return 404, {"error": f"stub: no route for {method} {path}", "code": 5}


@pytest.fixture
def kfp_server():
    stubs: list = []

    def start(**kw):
        stub = KfpStub(**kw)

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                parsed = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                query = parse_qs(parsed.query)
                stub.requests.append({"method": self.command, "path": parsed.path, "query": query,
                                      "headers": dict(self.headers), "body": body})
                status, payload = stub.respond(self.command, parsed.path, query, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args):  # keep pytest output clean
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        stubs.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", stub

    yield start
    for server in stubs:
        server.shutdown()
        server.server_close()


def _only(stub: KfpStub, method: str, path: str) -> dict:
    hits = [r for r in stub.requests if r["method"] == method and r["path"] == path]
    assert len(hits) == 1, [(r["method"], r["path"]) for r in stub.requests]
    return hits[0]


def test_submit_creates_experiment_and_run_with_the_compiled_spec(kfp_server) -> None:
    host, stub = kfp_server()
    result = submit(host, {"source": "s3://bucket/data", "iterations": 50, "dvc_rev": None},
                    experiment="recontrast", run_name="nightly", package_path=str(GOLDEN))
    assert result["run_id"] == "run-1" and result["experiment_id"] == "exp-1"

    exp = json.loads(_only(stub, "POST", "/apis/v2beta1/experiments")["body"])
    assert exp["display_name"] == "recontrast"
    run = json.loads(_only(stub, "POST", "/apis/v2beta1/runs")["body"])
    assert run["display_name"] == "nightly"
    assert run["experiment_id"] == "exp-1"
    # The whole compiled package travels in the run request: IR spec + kubernetes platform spec.
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "recontrast-training"
    k8s = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert any("emptyDirMounts" in e for e in k8s.values())
    params = run["runtime_config"]["parameters"]
    assert params == {"source": "s3://bucket/data", "iterations": 50}  # None = pipeline default


def test_submit_reuses_an_existing_experiment(kfp_server) -> None:
    host, stub = kfp_server(existing_experiment=True)
    result = submit(host, {}, package_path=str(GOLDEN))
    assert result["experiment_id"] == "exp-0"
    assert not [r for r in stub.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/experiments"]
    assert json.loads(_only(stub, "POST", "/apis/v2beta1/runs")["body"])["experiment_id"] == "exp-0"


def test_schedule_uploads_pipeline_and_creates_recurring_run(kfp_server) -> None:
    host, stub = kfp_server()
    result = schedule(host, "0 3 * * 1", {"source": "s3://bucket/data"}, job_name="weekly",
                      package_path=str(GOLDEN))
    assert result["recurring_run_id"] == "rr-1"
    assert result["cron"] == "0 0 3 * * 1"  # KFP cron has seconds first

    upload = _only(stub, "POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["recontrast-training"]
    assert b"recontrast-training" in upload["body"] and b"deploymentSpec" in upload["body"]

    rr = json.loads(_only(stub, "POST", "/apis/v2beta1/recurringruns")["body"])
    assert rr["display_name"] == "weekly"
    assert rr["experiment_id"] == "exp-1"
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert int(rr["max_concurrency"]) == 1
    assert rr["no_catchup"] is True
    assert rr["mode"] == "ENABLE"
    assert rr["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "pv-1"}
    assert rr["runtime_config"]["parameters"] == {"source": "s3://bucket/data"}


def test_schedule_adds_a_version_to_an_existing_pipeline(kfp_server) -> None:
    host, stub = kfp_server(existing_pipeline=True)
    result = schedule(host, "0 0 3 * * *", {}, package_path=str(GOLDEN))
    assert result["pipeline_id"] == "pl-0" and result["pipeline_version_id"] == "pv-2"
    up = _only(stub, "POST", "/apis/v2beta1/pipelines/upload_version")
    assert up["query"]["pipelineid"] == ["pl-0"]
    assert not [r for r in stub.requests if r["path"] == "/apis/v2beta1/pipelines/upload"]
    rr = json.loads(_only(stub, "POST", "/apis/v2beta1/recurringruns")["body"])
    assert rr["pipeline_version_reference"]["pipeline_id"] == "pl-0"
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"


def test_submit_compiles_the_pipeline_when_no_package_is_given(kfp_server) -> None:
    host, stub = kfp_server()
    submit(host, {"adapt_method": "msc", "shots": 8})
    run = json.loads(_only(stub, "POST", "/apis/v2beta1/runs")["body"])
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "recontrast-training"
    assert run["runtime_config"]["parameters"] == {"adapt_method": "msc", "shots": 8}


def test_cli_submit_and_schedule(kfp_server, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from recontrast_core.cli.pipeline import pipeline_app
    from recontrast_core.config import PipelineConfig

    host, stub = kfp_server()
    runner = CliRunner()
    res = runner.invoke(pipeline_app, ["submit", "--host", host, "--source", "s3://bucket/tiles",
                                       "--iterations", "5", "--package", str(GOLDEN), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run_id"] == "run-1"
    params = json.loads(_only(stub, "POST", "/apis/v2beta1/runs")["body"])["runtime_config"]["parameters"]
    assert params["source"] == "s3://bucket/tiles" and params["settings"]["train"]["iterations"] == 5
    assert params["settings"]["train"]["image_size"] == PipelineConfig().train.image_size  # embedded defaults
    assert params["settings"]["data"]["copy_local"] is False

    res = runner.invoke(pipeline_app, ["schedule", "--host", host, "--cron", "*/30 * * * *",
                                       "--source", "/mnt/datasets/tiles", "--package", str(GOLDEN), "--json"])
    assert res.exit_code == 0, res.output
    rr = json.loads(_only(stub, "POST", "/apis/v2beta1/recurringruns")["body"])
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 */30 * * * *"
    assert rr["runtime_config"]["parameters"]["settings"]["data"]["copy_local"] is True  # a folder travels in the artifact

    out = tmp_path / "p.yaml"
    res = runner.invoke(pipeline_app, ["compile", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and json.loads(res.stdout)["path"] == str(out)


def test_schedule_rejects_a_bad_cron() -> None:
    from recontrast_core.errors import UserError

    with pytest.raises(UserError, match="cron"):
        schedule("http://127.0.0.1:9", "every day", {}, package_path=str(GOLDEN))
