"""Links into the MLflow UI: one builder (tracking.ui_url), every link opening MLflow 3's
classic runs view (``?workflowType=machine_learning``), no credential in a printed link."""

from __future__ import annotations

import pytest

from recontrast_core.mlops import tracking
from recontrast_core.mlops.tracking import ML_VIEW_QUERY, ui_base_url, ui_url


@pytest.mark.parametrize("uri, base", [
    ("sqlite:////work/mlflow.db", "http://127.0.0.1:5000"),  # `mlflow ui` on the file
    ("file:///tmp/mlruns", "http://127.0.0.1:5000"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("http://127.0.0.1:5000/", "http://127.0.0.1:5000"),
    ("https://user:s3cr3t@mlflow.example.org/prefix/", "https://mlflow.example.org/prefix"),
    ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_base_url(uri, base):
    assert ui_base_url(uri) == base


def test_every_link_opens_the_classic_runs_view():
    uri = "http://u:pw@10.1.2.3:5000"
    links = {
        "experiment": ui_url(uri, experiment_id="7"),
        "run": ui_url(uri, experiment_id="7", run_id="abc123"),
        "artifact": ui_url(uri, experiment_id="7", run_id="abc123", artifact_path="evaluation/plots/overlay_grid.png"),
        "version": ui_url(uri, model_name="recontrast", version="3"),
        "experiments": ui_url(uri),
    }
    assert links == {
        "experiment": "http://10.1.2.3:5000/#/experiments/7/runs?workflowType=machine_learning",
        "run": "http://10.1.2.3:5000/#/experiments/7/runs/abc123?workflowType=machine_learning",
        "artifact": "http://10.1.2.3:5000/#/experiments/7/runs/abc123/artifacts/evaluation/plots/overlay_grid.png"
                    "?workflowType=machine_learning",
        "version": "http://10.1.2.3:5000/#/models/recontrast/versions/3?workflowType=machine_learning",
        "experiments": "http://10.1.2.3:5000/#/experiments?workflowType=machine_learning",
    }
    assert all(link.endswith("?" + ML_VIEW_QUERY) and "pw" not in link for link in links.values())
    assert ui_url(uri, model_name="a b/c", version="1").endswith("#/models/a%20b%2Fc/versions/1?" + ML_VIEW_QUERY)


def test_pipeline_links_from_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.embedded_tracking_uri(tmp_path)
    run_id = tracking.start_pipeline_run("pr-links", experiment="links", tracking_uri=uri, git_sha=None)
    exp_id = tracking.get_client(uri).get_run(run_id).info.experiment_id
    links = tracking.pipeline_links("pr-links", experiment="links", tracking_uri=uri, model_name="m", version="2")
    assert links == {
        "mlflow_experiment": f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?{ML_VIEW_QUERY}",
        "mlflow_run": f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}?{ML_VIEW_QUERY}",
        "mlflow_model_version": f"http://127.0.0.1:5000/#/models/m/versions/2?{ML_VIEW_QUERY}",
    }
    # an experiment that does not exist: no experiment link, and no error (links are a convenience)
    assert tracking.pipeline_links("pr-x", experiment="nope", tracking_uri=uri) == {}


def test_step_run_logs_the_classic_link_not_mlflows(tmp_path, monkeypatch, capsys):
    """On a tracking server MLflow prints "View run ... at <link without the view>" when a run
    ends; step_run turns that off and logs its own link (here: the store is a file, so the
    switch is only checked to be restored)."""
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    uri = tracking.embedded_tracking_uri(tmp_path)
    with tracking.step_run("pr-s", "train", experiment="links", tracking_uri=uri, git_sha=None):
        import os

        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    import os

    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
    assert "View run" not in capsys.readouterr().out


def test_pipeline_run_prints_the_links(tmp_path, monkeypatch):
    """`recontrast pipeline run --local` ends with the UI links, one a line (a table cell
    would fold them), and --json carries them."""
    import json

    from typer.testing import CliRunner

    import recontrast_core.pipelines.local_runner as local_runner
    from recontrast_core.cli.pipeline import pipeline_app

    uri = tracking.embedded_tracking_uri(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def fake_run_local(arguments, pipeline_root, verbose=False):
        pid = arguments["pipeline_run_id"]
        tracking.start_pipeline_run(pid, tracking_uri=uri, git_sha=None)
        return {"model_name": "recontrast", "version": "4", "pipeline_run_id": pid, "decision": "promoted"}

    monkeypatch.setattr(local_runner, "run_local", fake_run_local)
    args = ["run", "--local", "--tracking-uri", uri, "--pipeline-run-id", "pr-cli", "--pipeline-root", str(tmp_path)]
    res = CliRunner().invoke(pipeline_app, args, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for key in ("mlflow_experiment", "mlflow_run", "mlflow_model_version"):
        line = next(x for x in lines if x.startswith(key + ": "))
        assert line.endswith("?" + ML_VIEW_QUERY), line
    assert "mlflow_model_version: http://127.0.0.1:5000/#/models/recontrast/versions/4?" in res.output
    res = CliRunner().invoke(pipeline_app, args + ["--json"])
    out = json.loads(res.stdout)
    assert out["mlflow_experiment"].endswith("/runs?" + ML_VIEW_QUERY) and out["version"] == "4"


def test_demo_prints_the_links(tmp_path, monkeypatch, capsys):
    import recontrast_core.pipelines.local_runner as local_runner
    from recontrast_core.cli.demo import demo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.embedded_tracking_uri(tmp_path)

    def fake_run_local(arguments, pipeline_root, verbose=False):
        pid = arguments["pipeline_run_id"]
        tracking.start_pipeline_run(pid, tracking_uri=uri, git_sha=None)
        return {"model_name": "recontrast", "version": "1", "pipeline_run_id": pid, "decision": "promoted",
                "reason": "no champion", "champion": "1"}

    monkeypatch.setattr(local_runner, "run_local", fake_run_local)
    (tmp_path / "data" / "train" / "good").mkdir(parents=True)
    result = demo(data=tmp_path / "data", workdir=tmp_path)
    captured = capsys.readouterr()
    out = captured.out + captured.err  # the console writes to stderr
    assert result["mlflow_ui"] == f"mlflow ui --backend-store-uri {uri}"
    for key in ("mlflow_experiment", "mlflow_run", "mlflow_model_version"):
        assert result[key].startswith("http://127.0.0.1:5000/#/") and result[key].endswith("?" + ML_VIEW_QUERY)
        assert result[key] in out.replace("\n", "")  # printed whole
