"""The drift monitor end to end on a real small bundle: a patch-kNN detector (96 px, CPU)
fitted on magnetic-tile normals (``tiles_root``: the real dev set, else its synthetic
stand-in), its reference stored with its calibration, batch-scored windows judged by
``recontrast monitor`` (exit codes), MLflow runs per window, and the monitor step's KFP
adapter deciding a retraining after ``monitor.retrain_after`` consecutive retrain windows.

* held-out normals (images of the training population the detector never saw) -> ``ok``;
* the same images 30 % darker -> ``retrain`` (brightness and contrast against the training
  images'), exit code 11;
* normals with defects at the test split's rate -> the alarm rate rises above its expected
  value and is reported (``watch``), exit code 10.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

N_TRAIN, N_HELD, N_DEFECTS = 64, 32, 30


def _spread(files: list[Path], n: int) -> list[Path]:
    """``n`` files evenly spread over the sorted list (file names group tiles by lighting)."""
    files = sorted(files)
    if len(files) <= n:
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


@pytest.fixture(scope="module")
def monitored(tiles_root, tiles_are_synthetic, tmp_path_factory):
    """The bundle and three scored windows (batch-scoring outputs) with their image folders."""
    from PIL import Image

    from recontrast_core.config import CalibrationConfig, ModelConfig, TrainConfig
    from recontrast_core.data.layouts import read_mvtec
    from recontrast_core.fit import fit_detector
    from recontrast_core.mlops.batch_scoring import run_batch_scoring

    work = tmp_path_factory.mktemp("monitor")
    source = tiles_root
    if tiles_are_synthetic:  # enough images for the tests' windows
        from tests.synthetic_tiles import build_synthetic_tiles

        source = build_synthetic_tiles(work / "synthetic", counts={
            "train/good": N_TRAIN + N_HELD, "test/good": 8, "test/blowhole": 10, "test/break": 10, "test/crack": 10})
    normals = _spread(list((source / "train/good").iterdir()), N_TRAIN + N_HELD)
    train, held = normals[0::3] + normals[1::3], normals[2::3]  # same population, disjoint
    data = work / "data"
    (data / "train/good").mkdir(parents=True)
    for f in train:
        shutil.copy(f, data / "train/good" / f.name)
    (data / "test/good").mkdir(parents=True)
    shutil.copy(held[0], data / "test/good" / held[0].name)
    model = ModelConfig(kind="patchknn", patchknn={"image_size": 96, "fraction": 0.25})
    bundle = fit_detector(read_mvtec(data), model, TrainConfig(image_size=64, iterations=1, batch_size=4, device="cpu"),
                          work / "run", calibration=CalibrationConfig(validation_fraction=0.4), progress=False).bundle_dir

    folders = {"normal": work / "normal", "dark": work / "dark", "defects": work / "defects"}
    for f in held:
        (folders["normal"]).mkdir(exist_ok=True)
        shutil.copy(f, folders["normal"] / f.name)
        im = Image.open(f)
        folders["dark"].mkdir(exist_ok=True)
        Image.fromarray((np.asarray(im).astype(np.float32) * 0.7).round().astype(np.uint8), mode=im.mode).save(
            folders["dark"] / f.name)
    # defects at the test split's rate (of the full test split of the source)
    test = {d.name: list(d.iterdir()) for d in (tiles_root / "test").iterdir() if d.is_dir()}
    rate = sum(len(v) for k, v in test.items() if k != "good") / sum(len(v) for v in test.values())
    defect_src = [f for d in sorted((source / "test").iterdir()) if d.is_dir() and d.name != "good"
                  for f in _spread(list(d.iterdir()), N_DEFECTS // 3)]
    n_normal = int(round(len(defect_src) * (1 - rate) / rate))
    folders["defects"].mkdir()
    for f in held[:n_normal]:
        shutil.copy(f, folders["defects"] / f.name)
    for f in defect_src:
        shutil.copy(f, folders["defects"] / f"{f.parent.name}-{f.name}")
    scores = {}
    for name, folder in folders.items():
        scores[name] = work / f"scores-{name}"
        run_batch_scoring(str(bundle), [str(folder)], scores[name], overlays=False, device="cpu", progress=False)
    return SimpleNamespace(bundle=bundle, folders=folders, scores=scores, work=work, rate=rate, n_normal=n_normal,
                           n_defects=len(defect_src))


def test_the_bundle_carries_the_reference(monitored):
    from recontrast_core.bundle import load_detector

    ref = load_detector(monitored.bundle, "cpu").calibration.reference
    assert ref["n_scores"] >= 20 and len(ref["scores"]) == ref["n_scores"]
    assert ref["input"]["n_images"] == 2 * N_HELD and len(ref["input"]["brightness"]) == 101


def _monitor(monitored, name, tmp_path, *extra):
    from typer.testing import CliRunner

    from recontrast_core.cli.app import app

    out = tmp_path / f"mon-{name}"
    res = CliRunner().invoke(app, ["monitor", str(monitored.scores[name]), "--model", str(monitored.bundle),
                                   "--images", str(monitored.folders[name]), "--out", str(out), "--no-progress",
                                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra])
    report = json.loads((out / "monitor.json").read_text())
    assert (out / "monitor.png").stat().st_size > 10_000
    return res, report


def test_normal_dark_and_defective_windows(monitored, tmp_path):
    res, normal = _monitor(monitored, "normal", tmp_path)
    w = normal["windows"][-1]
    print("normal:", w["alarm"]["rate"], w["scores_below_threshold"], w["input"]["brightness"])
    assert res.exit_code == 0 and normal["verdict"] == "ok", (res.output, w["reasons"])
    assert w["n"] == N_HELD and w["input"]["n"] == N_HELD and normal["images"]["rows_matched"] == N_HELD

    res, dark = _monitor(monitored, "dark", tmp_path)
    w = dark["windows"][-1]
    print("dark:", w["reasons"])
    assert res.exit_code == 11 and dark["verdict"] == "retrain", res.output
    assert w["input"]["brightness"]["level"] == "major" and w["input"]["brightness"]["median"] < \
        0.75 * w["input"]["brightness"]["reference_median"]
    assert "input brightness drifted (major" in res.output

    res, defects = _monitor(monitored, "defects", tmp_path)
    w = defects["windows"][-1]
    print("defects:", monitored.rate, w["alarm"], w["reasons"])
    assert w["n"] == monitored.n_normal + monitored.n_defects
    assert w["alarm"]["rate"] > normal["windows"][-1]["alarm"]["rate"] and w["alarm"]["high"]
    assert defects["verdict"] in ("watch", "retrain") and res.exit_code in (10, 11)
    assert any(r.startswith("alarm rate") for r in w["reasons"]) and "alarm rate" in res.output

    # one MLflow run per window, found again on a rerun (no duplicates)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("recontrast-monitor")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3 and {r.data.tags["monitor.verdict"] for r in runs} == {"ok", "retrain", defects["verdict"]}
    assert all(r.data.tags["monitor.model_version"] == normal["model"]["version"] for r in runs)
    _monitor(monitored, "normal", tmp_path)
    assert len(client.search_runs([exp.experiment_id])) == 3
    dark_run = next(r for r in runs if r.data.tags["monitor.scores"].endswith("scores-dark"))
    assert dark_run.data.tags["monitor.verdict"] == "retrain"
    assert dark_run.data.metrics["input_brightness_psi"] > 0.25 and dark_run.data.metrics["n_images"] == N_HELD


def test_bad_input_is_exit_2_one_line(monitored, tmp_path):
    from typer.testing import CliRunner

    from recontrast_core.cli.app import app

    other = tmp_path / "other.csv"
    other.write_text("path,score,model_version\n/a.png,1.0,recontrast/7\n")
    for args, message in (
        ([str(tmp_path / "nothing")], "no such folder"),
        ([str(other)], "no row was scored by bundle:"),
        ([str(monitored.scores["normal"]), "--window", "daily"], "monitor.window"),
        ([str(monitored.scores["normal"]), "--since", "100"], "expected a duration"),
        ([str(monitored.scores["normal"]), "--images", str(tmp_path / "none")], "no such file or folder"),
    ):
        res = CliRunner().invoke(app, ["monitor", *args, "--model", str(monitored.bundle), "--no-track",
                                       "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output and not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["monitor", str(other), "--model", str(monitored.bundle), "--no-track",
                                   "--any-version", "--set", "monitor.min_images=1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "rows_used" in res.output, res.output  # the other version's row, on request


def _timeline(monitored, tmp_path) -> Path:
    """One table, three hours: the normal window, then the dark one twice (as a day of a
    score log would hold them); paths point at the image folders."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
    tables = []
    for hour, name in enumerate(("normal", "dark", "dark")):
        t = pq.read_table(monitored.scores[name] / "results.parquet")
        stamp = pa.array([t0 + dt.timedelta(hours=hour, minutes=5)] * t.num_rows, type=t.schema.field("scored_at").type)
        t = t.set_column(t.schema.get_field_index("scored_at"), "scored_at", stamp)
        if hour == 2:  # the second dark hour: other keys, the same images
            paths = pa.array([p.replace("/dark/", "/dark2/") for p in t.column("path").to_pylist()])
            t = t.set_column(t.schema.get_field_index("path"), "path", paths)
        tables.append(t)
    shutil.copytree(monitored.folders["dark"], monitored.work / "dark2", dirs_exist_ok=True)
    out = tmp_path / "timeline.parquet"
    pq.write_table(pa.concat_tables(tables), out)
    return out


def test_the_monitor_step_decides_a_retraining_after_n_windows(monitored, tmp_path):
    """The KFP adapter (what the monitor pipeline's first task runs): hourly windows ok,
    retrain, retrain -> a retraining is due (retrain_after 2), with the reason and the two
    windows' MLflow runs; once those are marked as submitted, it is not due again."""
    from recontrast_core.config import PipelineConfig
    from recontrast_core.mlops.monitoring import mark_submitted
    from recontrast_core.steps import get_step

    table = _timeline(monitored, tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = PipelineConfig(tracking={"tracking_uri": tracking}, monitor={"window": "1h", "retrain_after": 2})
    logged = {}

    def values():
        return {"settings": settings.model_dump(mode="json", exclude_none=True), "model_uri": str(monitored.bundle),
                "scores_uri": str(table), "images_uri": str(monitored.work), "window": "", "since": "",
                "pipeline_run_id": "", "kfp_run_id": "kfp-run-1",
                "report": SimpleNamespace(path=str(tmp_path / "report")),
                "metrics": SimpleNamespace(log_metric=lambda k, v: logged.__setitem__(k, v))}

    verdict, due, reason, runs = get_step("monitor").component(values())
    report = json.loads((tmp_path / "report" / "monitor.json").read_text())
    assert [w["verdict"] for w in report["windows"]] == ["ok", "retrain", "retrain"], \
        [w["reasons"] for w in report["windows"]]
    assert verdict == "retrain" and due is True
    assert reason.startswith("drift monitor: 2 consecutive retrain windows (2026-03-01T09:00:00+00:00, "
                             "2026-03-01T10:00:00+00:00)") and "input brightness drifted" in reason
    run_ids = json.loads(runs)
    assert run_ids == [w["mlflow_run_id"] for w in report["windows"][1:]] and logged["windows"] == 3.0

    mark_submitted(run_ids, "kfp-retrain-7", reason, tracking)
    verdict, due, _, _ = get_step("monitor").component(values())
    assert verdict == "retrain" and due is False
