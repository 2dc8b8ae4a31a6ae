"""The MLflow UI as a person opens it from the links the tool prints: a real ``mlflow server``
on loopback, a pipeline run logged as the steps log it, headless Chromium
(benchmarks/ui_screenshot.py does the work and saves the PNGs; docs/results/mlflow_ui_*.png
are its pictures). Skipped where Playwright or Debian's Chromium is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ui_screenshot  # noqa: E402  (benchmarks/ui_screenshot.py)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ui_checks(tmp_path_factory):
    why = ui_screenshot.browser_available()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    server = ui_screenshot.Server(tmp / "server")
    try:
        info = ui_screenshot.log_pipeline(server.url, ui_screenshot.synthetic_evaluation(tmp / "eval"))
        checks = ui_screenshot.screenshots(info, tmp / "shots")
    finally:
        server.stop()
    return info, checks, tmp / "shots"


def test_printed_experiment_link_opens_the_classic_runs_table(ui_checks):
    info, checks, shots = ui_checks
    assert info["links"]["mlflow_experiment"].endswith("/runs?workflowType=machine_learning")
    runs = checks["runs_view"]
    assert runs["run_name_column"] and runs["pipeline_run_listed"], runs
    assert not runs["genai_view"] and runs["ml_view_in_url"], runs
    # without the parameter MLflow 3.17 opens the GenAI view, the experiment tag notwithstanding
    assert checks["without_param"]["genai_view"] and not checks["without_param"]["run_name_column"]
    assert (shots / "mlflow_ui_runs.png").stat().st_size > 10_000


def test_overlay_grid_preview_and_the_versions_metrics(ui_checks):
    _, checks, shots = ui_checks
    preview = checks["overlay_preview"]
    assert preview["natural_width_px"] <= 1000 and preview["shown_width_px"] >= 600, preview  # near its own size
    assert not checks["model_version"]["metric_tags_shown"] and checks["model_version"]["source_model_link"]
    assert checks["logged_model"]["image_auroc_shown"]
    assert {p.name for p in shots.glob("*.png")} >= {"mlflow_ui_overlay_grid.png", "mlflow_ui_logged_model.png"}
