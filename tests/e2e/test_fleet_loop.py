"""Two product lines through the whole operations loop, against real servers on loopback.

For each line (``line: a`` and ``line: b``, settings ``recontrast-<line>``):

1. train, evaluate and register (the pipeline's steps, tiny settings: 64 px, 2 iterations,
   one block per decoder stage) on the line's dataset, a DVC-tracked folder of a git
   repository whose DVC remote is a moto S3 server; the model is ``recontrast-<line>``;
2. batch scoring of new images from ``s3://`` into ``s3://`` with ``models:/recontrast-<line>@champion``;
3. the drift monitor on that table (``recontrast monitor``, one MLflow run per window);
4. recalibration on new normal images (``recontrast recalibrate``, target FPR 0.3 so that
   some production images are flagged), a new version that becomes the champion;
5. batch scoring again and the monitor on the new champion's table; then a window of the
   line's normal images scored and monitored: as they are for line a (``ok``), 30 % darker
   for line b (``watch`` or ``retrain``);
6. a review round trip: ``recontrast review export`` of the flagged and borderline images,
   a reviewer's edits (defects keep a polygon, good images lose theirs), ``recontrast review
   import`` into the line's dataset: a new DVC version pushed to S3 that ``recontrast data
   check`` accepts.

Then ``recontrast registry status --all`` lists both lines: the recalibrated champion, its
kind, primary metric, age and the monitor's verdict. MLflow is a real ``mlflow server``
with its artifacts on the same moto S3. Data: ``tiles_root`` (the real magnetic-tile-dev,
or its synthetic stand-in). The commands run in-process (typer's CliRunner: the same code
as the ``recontrast`` executable, without a Python start per command).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_dev_tool
from tests.integration.test_ingest import DVC, GIT_ENV, _run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# line -> its defect type; each line gets its own images (no file in two places)
LINES = {"a": "blowhole", "b": "crack"}
DRIFTED = "b"  # its monitored window is darkened by 30 %
N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT = 8, 2, 2
N_INCOMING_GOOD, N_INCOMING_DEFECT, N_NORMALS = 4, 3, 20
DVC_BUCKET, IN_BUCKET, OUT_BUCKET = "fleet-dvc", "fleet-incoming", "fleet-scores"
# `recontrast monitor --json` against a tracking server prints nothing but the report on
# stdout (MLflow's own "View run ... at" lines are off while it ends its runs): strict.
MONITOR_STDOUT_LENIENT = False
TINY = {"train.image_size": 64, "train.iterations": 2, "train.batch_size": 4, "train.decoder_blocks": [1, 1, 1],
        "train.bottleneck_blocks": 1, "train.device": "cpu", "model.kind": "recontrast", "baseline.enabled": False,
        "registry.floors": {}, "registry.baseline_floor": False}


def invoke(*args: str, ok=(0,), progress_flag: bool = True, lenient: bool = False) -> dict:
    """``recontrast ARGS [--no-progress] --json`` in-process; the parsed JSON (exit code in ``ok``).
    ``lenient``: lines before the JSON document are ignored."""
    from typer.testing import CliRunner

    from recontrast_core.cli.app import app

    res = CliRunner().invoke(app, [*map(str, args), *(["--no-progress"] if progress_flag else []), "--json"])
    assert res.exit_code in ok, (args, res.exit_code, res.stderr[-3000:], res.exception)
    text = res.stdout[res.stdout.find("{\n"):] if lenient else res.stdout
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError((args, res.exit_code, res.stdout[:1500], res.stderr[-3000:])) from None


def _split_files(tiles_root: Path) -> dict:
    """Disjoint files per line and purpose, from the sorted folders."""
    good = sorted((tiles_root / "train" / "good").iterdir())
    test_good = sorted((tiles_root / "test" / "good").iterdir())
    per_line = N_TRAIN + N_INCOMING_GOOD + N_NORMALS
    out = {}
    for i, (line, defect) in enumerate(LINES.items()):
        g = good[i * per_line:(i + 1) * per_line]
        defects = sorted((tiles_root / "test" / defect).iterdir())
        out[line] = {"train": g[:N_TRAIN], "incoming_good": g[N_TRAIN:N_TRAIN + N_INCOMING_GOOD],
                     "normals": g[N_TRAIN + N_INCOMING_GOOD:],
                     "test_good": test_good[i * N_TEST_GOOD:(i + 1) * N_TEST_GOOD],
                     "test_defect": defects[:N_TEST_DEFECT],
                     "incoming_defect": defects[N_TEST_DEFECT:N_TEST_DEFECT + N_INCOMING_DEFECT]}
    return out


@pytest.fixture(scope="module")
def fleet(moto_s3, mlflow_server, tiles_root, tmp_path_factory):
    dvc = require_dev_tool(DVC, "dvc (the pipeline extra)")
    work = tmp_path_factory.mktemp("fleet")
    mp = pytest.MonkeyPatch()
    for key, value in {**moto_s3.env(), **GIT_ENV, "MLFLOW_TRACKING_URI": mlflow_server.url}.items():
        mp.setenv(key, value)
    mp.delenv("RECONTRAST_PIPELINE_RUN_ID", raising=False)
    s3 = moto_s3.client()
    for bucket in (DVC_BUCKET, IN_BUCKET, OUT_BUCKET):
        s3.create_bucket(Bucket=bucket)
    env = {**os.environ}
    repo = work / "datarepo"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    _run([dvc, "config", "core.analytics", "false"], repo, env)
    _run([dvc, "remote", "add", "-d", "s3remote", f"s3://{DVC_BUCKET}/data"], repo, env)
    _run([dvc, "remote", "modify", "s3remote", "endpointurl", moto_s3.endpoint_url], repo, env)
    files = _split_files(tiles_root)
    for line, defect in LINES.items():
        root, f = repo / "data" / f"line-{line}", files[line]
        for folder, items in (("train/good", f["train"]), ("test/good", f["test_good"]),
                              (f"test/{defect}", f["test_defect"])):
            (root / folder).mkdir(parents=True, exist_ok=True)
            for p in items:
                shutil.copy2(p, root / folder / p.name)
        (root / "ground_truth" / defect).mkdir(parents=True)
        for p in f["test_defect"]:
            shutil.copy2(tiles_root / "ground_truth" / defect / f"{p.stem}_mask.png", root / "ground_truth" / defect)
        for p in f["incoming_good"] + f["incoming_defect"]:
            s3.upload_file(str(p), IN_BUCKET, f"{line}/{p.name}")
        (work / f"normals-{line}").mkdir()
        for p in f["normals"]:
            shutil.copy2(p, work / f"normals-{line}" / p.name)
        _run([dvc, "add", "-q", f"data/line-{line}"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "data: two lines"], repo, env)
    _run([dvc, "push", "-q"], repo, env)
    yield {"work": work, "repo": repo, "files": files}
    mp.undo()


def _train_and_register(line: str, fleet: dict) -> dict:
    from recontrast_core import steps
    from recontrast_core.steps.settings import apply_overrides

    s = apply_overrides(None, {"line": line, "data.source": str(fleet["repo"] / "data" / f"line-{line}"), **TINY})
    assert s.registry.model_name == f"recontrast-{line}" and s.tracking.experiment == f"recontrast-{line}"
    out = fleet["work"] / f"run-{line}"
    manifest = steps.ingest(out / "ingest", s)
    steps.train(manifest, out / "train", s, progress=False)
    steps.evaluate(out / "train", manifest, out / "evaluate", s, progress=False)
    return steps.register(out / "train", out / "evaluate" / "metrics.json", s, manifest=manifest,
                          pipeline_run_id=f"fleet-train-{line}")


def _darkened(src: Path, dst: Path, factor: float) -> Path:
    """Copies of the images in ``src`` with every grey level times ``factor`` (a dimmer lamp)."""
    import numpy as np
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        arr = np.asarray(Image.open(p).convert("L"), dtype=np.float32)
        Image.fromarray(np.clip(arr * factor, 0, 255).astype(np.uint8)).save(dst / f"{p.stem}.png")
    return dst


def _review(project: Path, defects: set[str]) -> None:
    """The reviewer: a defect keeps its polygons (or gets one), a good image loses them."""
    meta = json.loads((project / "review.json").read_text())
    for item in meta["items"]:
        path = project / item["annotation"]
        doc = json.loads(path.read_text())
        doc["flags"]["reviewed"] = True
        if Path(item["source"]).name in defects:
            if not doc["shapes"]:
                w, h = doc["imageWidth"] - 1, doc["imageHeight"] - 1
                doc["shapes"] = [{"label": "anomaly", "points": [[w * 0.3, h * 0.3], [w * 0.6, h * 0.3],
                                                                [w * 0.5, h * 0.6]],
                                  "group_id": None, "description": "", "shape_type": "polygon", "flags": {},
                                  "mask": None}]
        else:
            doc["shapes"] = []
        path.write_text(json.dumps(doc))


def test_two_lines_through_train_score_monitor_recalibrate_review(fleet, mlflow_server):
    work, repo = fleet["work"], fleet["repo"]
    results = {}
    for line, defect in LINES.items():
        model = f"models:/recontrast-{line}@champion"
        # 1. train, register: the line's model
        reg = _train_and_register(line, fleet)
        assert reg["model_name"] == f"recontrast-{line}" and reg["decision"] == "promoted", reg

        # 2. batch scoring, S3 -> S3
        scored = invoke("predict", "--model", model, f"s3://{IN_BUCKET}/{line}/", "--out",
                        f"s3://{OUT_BUCKET}/{line}/v1/")
        assert scored["images"] == N_INCOMING_GOOD + N_INCOMING_DEFECT
        assert scored["model_version"] == f"recontrast-{line}/{reg['version']}"

        # 3. the drift monitor (exit 0 / 10 / 11: the verdict)
        mon = invoke("monitor", f"s3://{OUT_BUCKET}/{line}/v1/", "--model", model, "--set", f"line={line}",
                     "--out", work / f"monitor-{line}-v1", ok=(0, 10, 11), lenient=MONITOR_STDOUT_LENIENT)
        assert mon["verdict"] in ("ok", "watch", "retrain")

        # 4. recalibration on new normals: a new version, the champion
        recal = invoke("recalibrate", fleet["work"] / f"normals-{line}", "--model", model, "--target-fpr", "0.3",
                       "--out", work / f"recal-{line}", "--set", f"line={line}")
        assert recal["decision"] == "promoted" and recal["champion"] == recal["version"], recal
        assert recal["parent"] == f"recontrast-{line}/{reg['version']}" and recal["n_images"] == N_NORMALS
        assert recal["seconds"] < 60

        # 5. scoring with the recalibrated champion, monitored
        scored2 = invoke("predict", "--model", model, f"s3://{IN_BUCKET}/{line}/", "--out",
                         f"s3://{OUT_BUCKET}/{line}/v2/")
        assert scored2["model_version"] == f"recontrast-{line}/{recal['version']}"
        mon2 = invoke("monitor", f"s3://{OUT_BUCKET}/{line}/v2/", "--model", model, "--set", f"line={line}",
                      "--out", work / f"monitor-{line}-v2", ok=(0, 10, 11), lenient=MONITOR_STDOUT_LENIENT)

        # 5b. drift: a window of the line's normals as they are (line a), or 30 % darker (line b)
        window = fleet["work"] / f"normals-{line}"
        if line == DRIFTED:
            window = _darkened(window, work / f"darker-{line}", 0.7)
        invoke("predict", "--model", model, window, "--out", work / f"scores-{line}-window")
        mon3 = invoke("monitor", work / f"scores-{line}-window", "--model", model, "--images", window,
                      "--set", f"line={line}", "--out", work / f"monitor-{line}-window", ok=(0, 10, 11),
                      lenient=MONITOR_STDOUT_LENIENT)
        if line == DRIFTED:
            assert mon3["verdict"] in ("watch", "retrain"), mon3
        else:
            assert mon3["verdict"] == "ok", mon3

        # 6. review round trip into the line's DVC dataset
        project = work / f"review-{line}"
        exported = invoke("review", "export", "--scores", f"s3://{OUT_BUCKET}/{line}/v2/", "--out", project,
                          "--band", "0.0,1.0", "--label", defect)
        assert len(exported["items"]) == N_INCOMING_GOOD + N_INCOMING_DEFECT  # the band takes every image
        assert exported["model"]["version"] == scored2["model_version"]
        defects = {p.name for p in fleet["files"][line]["incoming_defect"]}
        _review(project, defects)
        imported = invoke("review", "import", project, "--dataset", repo / "data" / f"line-{line}", "--tag",
                          f"line-{line}-review-1")
        assert (imported["anomalies"], imported["normals"]) == (N_INCOMING_DEFECT, N_INCOMING_GOOD), imported
        assert imported["dvc"]["md5"] != imported["dvc"]["previous_md5"] and imported["dvc"]["pushed"] > 0
        check = invoke("data", "check", repo / "data" / f"line-{line}")
        assert check["ok"] and check["splits"]["train"]["normal"] == N_TRAIN + N_INCOMING_GOOD
        results[line] = {"reg": reg, "recal": recal, "verdict": mon3["verdict"]}

    # the data repository: one commit per review import, each tagged, nothing left uncommitted
    log = subprocess.run(["git", "-C", repo, "log", "--format=%s"], capture_output=True, text=True).stdout
    assert log.count("review import") == 2
    assert subprocess.run(["git", "-C", repo, "status", "--porcelain"], capture_output=True,
                          text=True).stdout.strip() == ""

    # the fleet: both lines, the recalibrated champions, the monitor's verdicts
    fleet_rows = {r["line"]: r for r in invoke("registry", "status", "--all", progress_flag=False)["lines"]}
    assert set(LINES) <= set(fleet_rows)
    for line in LINES:
        row = fleet_rows[line]
        assert row["model_name"] == f"recontrast-{line}" and row["champion"] == results[line]["recal"]["version"]
        assert row["model_kind"] == "recontrast" and row["primary_metric"] == "image_auroc"
        assert row["primary_value"] is not None and row["age"]
        assert row["monitor_verdict"] == results[line]["verdict"]
