"""The fleet (``recontrast registry status --all``, mlops/fleet.py) on an embedded SQLite
registry, and a product line's names reaching the retraining schedule (a KFP stub)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from recontrast_core.mlops.fleet import fleet_status, human_age, line_of
from tests.unit.test_pipeline_client import GOLDEN, _only, kfp_server  # noqa: F401  (the KFP stub fixture)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def registry_uri(tmp_path: Path) -> str:
    """Three lines and a model outside the fleet, registered straight into a SQLite store."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    src = tmp_path / "model"
    src.mkdir()

    def version(name: str, tags: dict, champion: bool = True) -> str:
        try:
            client.create_registered_model(name)
        except Exception:
            pass
        mv = client.create_model_version(name, str(src), tags=tags)
        if champion:
            client.set_registered_model_alias(name, "champion", mv.version)
        return mv.version

    version("recontrast", {"model_kind": "auto", "metric.image_auroc": "0.93"})
    version("recontrast-a", {"model_kind": "patchknn", "metric.image_auroc": "0.81"}, champion=False)
    version("recontrast-a", {"model_kind": "patchknn", "metric.image_auroc": "0.88", "monitor_verdict": "watch",
                             "monitor_verdict_at": "2026-12-01T00:00:00+00:00"})
    v = version("recontrast-b", {"model_kind": "recontrast", "metric.synthetic_image_auroc": "0.7"})
    client.create_registered_model("recontrast-c")  # a line without a champion yet
    client.create_registered_model("other-model")
    # line b's verdict: the monitor's window runs in its experiment (newest wins)
    exp = client.create_experiment("recontrast-b-monitor")
    for verdict in ("ok", "retrain"):
        run = client.create_run(exp, tags={"monitor.verdict": verdict, "monitor.model_version": f"recontrast-b/{v}",
                                           "monitor.window_end": f"2026-12-0{1 + (verdict == 'retrain')}"})
        client.set_terminated(run.info.run_id)
        time.sleep(0.01)
    stale = client.create_run(exp, tags={"monitor.verdict": "watch", "monitor.model_version": "recontrast-b/99"})
    client.set_terminated(stale.info.run_id)
    return uri


def test_the_fleet_lists_every_line(registry_uri):
    from recontrast_core.mlops.registry_lookup import get_client

    rows = {r["model_name"]: r for r in fleet_status(get_client(registry_uri))}
    assert list(rows) == ["recontrast", "recontrast-a", "recontrast-b", "recontrast-c"]
    assert rows["recontrast"]["line"] is None and rows["recontrast-a"]["line"] == "a"
    a = rows["recontrast-a"]
    assert (a["champion"], a["model_kind"], a["primary_metric"], a["primary_value"]) == ("2", "patchknn",
                                                                                          "image_auroc", 0.88)
    assert a["monitor_verdict"] == "watch" and a["versions"] == 2 and a["age_s"] < 600
    b = rows["recontrast-b"]
    assert b["primary_metric"] == "synthetic_image_auroc" and b["monitor_verdict"] == "retrain"
    assert rows["recontrast-c"]["champion"] is None and rows["recontrast-c"]["monitor_verdict"] is None
    assert rows["recontrast"]["monitor_verdict"] is None


def test_registry_status_all_prints_the_fleet(registry_uri):
    from typer.testing import CliRunner

    from recontrast_core.cli.app import app

    res = CliRunner().invoke(app, ["registry", "status", "--all", "--tracking-uri", registry_uri, "--json"])
    assert res.exit_code == 0, res.output
    lines = {r["line"]: r for r in json.loads(res.stdout)["lines"]}
    assert set(lines) == {None, "a", "b", "c"} and lines["b"]["monitor_verdict"] == "retrain"
    res = CliRunner().invoke(app, ["registry", "status", "--all", "--tracking-uri", registry_uri])
    assert res.exit_code == 0 and "fleet" in res.stderr and "retrain" in res.stderr


def test_names_and_ages():
    assert line_of("recontrast-tiles-a") == "tiles-a" and line_of("recontrast") is None
    assert [human_age(s) for s in (5, 65, 3600 * 5 + 60, 86400 * 3 + 7200)] == ["5s", "1m 5s", "5h 1m", "3d 2h"]


def test_a_lines_schedule_experiment_and_model_are_named_after_it(kfp_server):  # noqa: F811
    from typer.testing import CliRunner

    from recontrast_core.cli.pipeline import pipeline_app

    host, stub = kfp_server()
    res = CliRunner().invoke(pipeline_app, ["schedule", "--host", host, "--cron", "0 3 * * *", "--source",
                                            "s3://bucket/tiles-a", "--set", "line=tiles-a", "--package", str(GOLDEN),
                                            "--json"])
    assert res.exit_code == 0, res.output
    rr = json.loads(_only(stub, "POST", "/apis/v2beta1/recurringruns")["body"])
    assert rr["display_name"] == "recontrast-tiles-a-retrain"
    assert json.loads(_only(stub, "POST", "/apis/v2beta1/experiments")["body"])["display_name"] == "recontrast-tiles-a"
    params = rr["runtime_config"]["parameters"]
    assert params["model_name"] == "recontrast-tiles-a" and params["settings"]["line"] == "tiles-a"
    assert params["settings"]["tracking"]["experiment"] == "recontrast-tiles-a"
