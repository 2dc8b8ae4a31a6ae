"""Screenshots of the MLflow UI as a person opens it from the links the tool prints.

Starts a real ``mlflow server`` on loopback (SQLite, local artifacts, a free port), logs a
pipeline run the way the steps do (parent run, an ``evaluate`` child run with
``metrics.json`` and the plots, a ``register`` child run with a logged model whose metrics
are the version's, a registered version), then in headless Chromium (Debian's
``/usr/bin/chromium``, driven by Playwright):

1. opens the experiment link exactly as ``recontrast demo`` / ``pipeline run --local``
   print it (:func:`recontrast_core.mlops.tracking.pipeline_links`), waits for the runs
   table, saves ``mlflow_ui_runs.png`` and checks that the classic runs table is shown
   (its "Run Name" column and the pipeline's run), not the GenAI view;
2. for comparison, opens the same experiment without ``?workflowType=machine_learning``
   in a fresh browser profile and records where MLflow 3 takes it (the GenAI view);
3. opens the ``overlay_grid.png`` artifact's preview (``mlflow_ui_overlay_grid.png``);
4. opens the registered version (``mlflow_ui_model_version.png``) and its logged model's
   page (``mlflow_ui_logged_model.png``), where the version's metrics are shown.

    python benchmarks/ui_screenshot.py [--eval-dir DIR] [--out docs/results]

``--eval-dir``: an evaluate output folder (``metrics.json``, ``plots/``) to log, e.g. from
``recontrast evaluate BUNDLE DATA --out DIR``; without it a small synthetic evaluation is
drawn with :func:`recontrast_core.plots.overlay_grid`. Prints a JSON summary (the checks);
exit code 1 when a check fails. Needs ``playwright`` (pip) and Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("RECONTRAST_CHROMIUM", "/usr/bin/chromium")
# Debian's Chromium on a closed network (see the machine notes): no background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EXPERIMENT = "recontrast"
MODEL_NAME = "recontrast-ui"


def browser_available() -> Optional[str]:
    """None when Playwright and Chromium are there, else why not."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


# ----------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1 (its own process group, stopped by its pid)."""

    def __init__(self, workdir: Path, timeout: float = 120):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
               "--artifacts-destination", str(self.workdir / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(self.workdir / "server.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()


# ----------------------------------------------------------------------------- the run
def synthetic_evaluation(out: Path) -> Path:
    """A small evaluation folder (metrics.json, plots/) drawn by the tool's own plot code."""
    import numpy as np

    from recontrast_core.calibration import Calibration
    from recontrast_core.plots import overlay_grid, plot_roc_pr

    rng = np.random.default_rng(0)
    calib = Calibration(threshold=1.0, lo=0.0, hi=2.0, method="f1", target_fpr=None, n_normal=8, n_anomalous=8)
    spec = [(1, 1.8), (1, 1.5), (1, 0.6), (1, 1.2), (1, 0.3), (0, 1.3), (0, 0.7), (0, 0.4), (0, 0.2), (0, 0.5)]
    s = 96
    rows, images, maps, masks = [], [], [], []
    for i, (label, score) in enumerate(spec):
        img = (rng.normal(120, 12, (s, s)).clip(0, 255)).astype(np.uint8)
        mask = np.zeros((s, s), bool)
        amap = rng.random((s, s)).astype(np.float32) * 0.4
        if label:
            y, x = rng.integers(15, s - 35, 2)
            mask[y : y + 20, x : x + 14] = True
            img[mask] = 60
            amap[mask] += score
        else:
            amap += score * 0.6
        rows.append({"path": f"test/{'crack' if label else 'good'}/{i}.png", "label": label,
                     "defect_type": "crack" if label else "good", "score": score,
                     "normalized_score": min(score / 2, 1.0), "decision": score >= 1.0})
        images.append(np.repeat(img[None], 3, 0))
        maps.append(amap)
        masks.append(mask)
    plots = out / "plots"
    plot_roc_pr([r["label"] for r in rows], [r["score"] for r in rows], plots)
    overlay_grid(rows, np.stack(images), np.stack(maps), calib, plots / "overlay_grid.png", masks=masks)
    metrics = {"image_auroc": 0.92, "pixel_auroc": 0.95, "aupro": 0.81, "threshold": 1.0,
               "baseline_image_auroc": 0.88, "precision_at_threshold": 0.75, "recall_at_threshold": 0.6}
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "dataset_fingerprint": "f" * 64,
                                                  "per_image": rows}))
    return out


def log_pipeline(url: str, eval_dir: Path) -> dict:
    """A pipeline run on the server as the steps log it; returns the links the tool prints
    and the ids the screenshots need."""
    from recontrast_core.mlops import registry, tracking
    from recontrast_core.runtime import read_json

    payload = read_json(eval_dir / "metrics.json")
    metrics = {k: v for k, v in payload["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    pid = f"ui-{int(time.time())}"
    common = {"experiment": EXPERIMENT, "tracking_uri": url, "git_sha": None,
              "dataset_fingerprint": payload.get("dataset_fingerprint") or None}
    with tracking.step_run(pid, "evaluate", **common) as eval_run:
        tracking.log_evaluation(payload, eval_run, plots_dir=eval_dir / "plots")
    client = tracking.get_client(url)
    with tracking.step_run(pid, "register", **common) as reg_run:
        exp_id = client.get_run(reg_run).info.experiment_id
        # the register step's logged model (log_pyfunc's in the pipeline; an empty one here)
        lm = client.create_logged_model(exp_id, name="model", source_run_id=reg_run)
        client.finalize_logged_model(lm.model_id, "READY")
        version = registry.register_candidate(reg_run, MODEL_NAME, pid, metrics,
                                              str(payload.get("dataset_fingerprint") or ""),
                                              model_uri=f"models:/{lm.model_id}", client=client,
                                              tags={"model_kind": "recontrast"})
    tracking.end_pipeline_run(pid, experiment=EXPERIMENT, tracking_uri=url)
    links = tracking.pipeline_links(pid, experiment=EXPERIMENT, tracking_uri=url, model_name=MODEL_NAME,
                                    version=version)
    parent = tracking.find_pipeline_run(pid, EXPERIMENT, client)
    return {"tracking_uri": url, "pipeline_run_id": pid, "experiment_id": exp_id, "parent_run_id": parent.info.run_id,
            "parent_run_name": parent.info.run_name, "eval_run_id": eval_run, "model_id": lm.model_id,
            "version": version, "links": links,
            "overlay_link": tracking.ui_url(url, experiment_id=exp_id, run_id=eval_run,
                                            artifact_path="evaluation/plots/overlay_grid.png"),
            "logged_model_link": f"{tracking.ui_base_url(url)}/#/experiments/{exp_id}/models/{lm.model_id}"
                                 f"?{tracking.ML_VIEW_QUERY}"}


# ----------------------------------------------------------------------------- the browser
def _text(page) -> str:
    return page.evaluate("() => document.body.innerText")


def _close_assistant(page) -> None:
    """Close MLflow 3.17's assistant panel (open on a first visit; the browser profile then
    remembers it closed), so the pictures show the page itself. Best effort."""
    button = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    try:
        button.first.click(timeout=5000)
    except Exception:
        pass


def screenshots(info: dict, out: Path, timeout_ms: int = 60_000) -> dict:
    """Open the links in headless Chromium; save PNGs under ``out``; return the checks."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    checks: dict = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            # 1. the experiment link as printed: the classic runs table
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            page = context.new_page()
            page.goto(info["links"]["mlflow_experiment"])
            page.get_by_text(info["parent_run_name"], exact=True).first.wait_for(timeout=timeout_ms)
            page.get_by_role("columnheader", name="Run Name").first.wait_for(timeout=timeout_ms)
            _close_assistant(page)
            try:  # show the step runs under the pipeline's run
                page.locator('[data-component-id$="runnamecellrenderer.tsx_46"]').first.click(timeout=5000)
                page.get_by_text("evaluate", exact=True).first.wait_for(timeout=10_000)
            except Exception:
                pass
            page.wait_for_timeout(1500)  # let the table settle before the picture
            page.screenshot(path=str(out / "mlflow_ui_runs.png"))
            text = _text(page)
            checks["runs_view"] = {
                "url": page.url, "run_name_column": "Run Name" in text,
                "pipeline_run_listed": info["parent_run_name"] in text,
                # the GenAI view's side bar: Overview, Judges, Evaluation runs, Prompts
                "genai_view": "workflowType=genai" in page.url or "Evaluation runs" in text or "Judges" in text,
                "ml_view_in_url": "workflowType=machine_learning" in page.url,
            }

            # 2. the same experiment without the parameter, in a fresh profile, its experiment
            # tagged mlflow.experimentKind=custom_model_development: where MLflow 3 goes
            from recontrast_core.mlops import tracking

            tracking.get_client(info["tracking_uri"]).set_experiment_tag(
                info["experiment_id"], "mlflow.experimentKind", "custom_model_development")
            fresh = browser.new_context(viewport={"width": 1440, "height": 900})
            bare = fresh.new_page()
            bare.goto(info["links"]["mlflow_experiment"].split("/runs?")[0])
            bare.wait_for_timeout(8000)
            bare.screenshot(path=str(out / "mlflow_ui_without_view_param.png"))
            text = _text(bare)
            checks["without_param"] = {"url": bare.url, "experiment_kind_tag": "custom_model_development",
                                       "run_name_column": "Run Name" in text,
                                       "genai_view": "workflowType=genai" in bare.url or "/traces" in bare.url
                                       or "/overview" in bare.url}
            fresh.close()

            # 3. the overlay grid's artifact preview (the first profile: assistant closed)
            page.set_viewport_size({"width": 1440, "height": 1100})
            page.goto(info["overlay_link"])
            img = page.locator("img[src^='blob:']").first
            img.wait_for(timeout=timeout_ms)
            page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=timeout_ms)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "mlflow_ui_overlay_grid.png"))
            checks["overlay_preview"] = {"url": page.url, "shown_width_px": img.bounding_box()["width"],
                                         "natural_width_px": img.evaluate("el => el.naturalWidth")}

            # 4. the registered version and its logged model (the version's metrics)
            page.goto(info["links"]["mlflow_model_version"])
            page.get_by_text(f"Version {info['version']}").first.wait_for(timeout=timeout_ms)
            page.wait_for_timeout(2500)
            page.screenshot(path=str(out / "mlflow_ui_model_version.png"), full_page=True)
            text = _text(page)
            # MLflow 3.17's version page lists the version's tags (no metric.* ones now) and
            # links its logged model ("Source Model"), whose page lists the metrics
            checks["model_version"] = {"url": page.url, "metric_tags_shown": "metric." in text,
                                       "source_model_link": "Source Model" in text}
            page.goto(info["logged_model_link"])
            page.get_by_text("image_auroc").first.wait_for(timeout=timeout_ms)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "mlflow_ui_logged_model.png"), full_page=True)
            checks["logged_model"] = {"url": page.url, "image_auroc_shown": "image_auroc" in _text(page)}
            context.close()
        finally:
            browser.close()
    return checks


def passed(checks: dict) -> bool:
    runs = checks.get("runs_view", {})
    return bool(runs.get("run_name_column") and runs.get("pipeline_run_listed") and not runs.get("genai_view")
                and runs.get("ml_view_in_url") and checks.get("overlay_preview")
                and not checks.get("model_version", {}).get("metric_tags_shown")
                and checks.get("logged_model", {}).get("image_auroc_shown"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-dir", type=Path, help="an evaluate output folder (metrics.json, plots/)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="where the PNGs go")
    args = ap.parse_args(argv)
    why = browser_available()
    if why:
        print(json.dumps({"skipped": why}))
        return 2
    with tempfile.TemporaryDirectory(prefix="recontrast-ui-") as tmp:
        tmp = Path(tmp)
        eval_dir = args.eval_dir or synthetic_evaluation(tmp / "eval")
        server = Server(tmp / "server")
        try:
            info = log_pipeline(server.url, eval_dir)
            checks = screenshots(info, args.out)
        finally:
            server.stop()
            shutil.rmtree(tmp / "server", ignore_errors=True)
    summary = {"links": info["links"], "overlay_link": info["overlay_link"], "checks": checks,
               "passed": passed(checks), "screenshots": sorted(str(p) for p in args.out.glob("mlflow_ui_*.png"))}
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
