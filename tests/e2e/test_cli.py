"""The `recontrast` command as a user runs it: real images, exit codes, --json."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "recontrast_core.cli"]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_train_evaluate_predict_cli(tiny_tile, tmp_path):
    out = tmp_path / "run"
    r = run("train", tiny_tile, "--out", out, "--image-size", "64", "--iterations", "2", "--batch-size", "4", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["iterations"] == 2 and (out / "bundle" / "model.safetensors").is_file()

    r = run("evaluate", out / "bundle", tiny_tile, "--out", tmp_path / "eval", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)["metrics"]
    assert {"image_auroc", "pixel_auroc", "aupro", "aupro_per_image", "image_f1_max"} <= metrics.keys()
    assert "image_auroc" in r.stderr  # the summary table for humans

    r = run("predict", out / "bundle", tiny_tile / "test" / "crack", "--out", tmp_path / "pred", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and {"score", "normalized_score", "decision", "overlay"} <= rows[0].keys()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{missing}"], "missing"),
        (["train", "{bad}", "--iterations", "1"], "notes.txt"),
        (["train", "{bad}", "--image-size", "7"], "image_size"),
        (["evaluate", "{missing}", "{missing}"], "missing"),
        (["predict", "{missing}", "{missing}"], "not a model bundle"),
    ],
)
def test_user_errors_exit_2_with_one_line(tiny_mvtec, tmp_path, args, message):
    (tiny_mvtec / "train" / "good" / "notes.txt").write_text("not an image")
    subst = {"{missing}": str(tmp_path / "missing"), "{bad}": str(tiny_mvtec)}
    r = run(*[subst.get(a, a) for a in args], "--no-progress")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert message in r.stderr
    assert r.stderr.strip().startswith("error:")


def test_few_shot_training_cli(tiny_tile, tmp_path):
    out = tmp_path / "fs"
    r = run("train", tiny_tile, "--out", out, "--shots", "4", "--image-size", "64", "--iterations", "2",
            "--batch-size", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "bundle" / "bundle.json").read_text())
    assert meta["train_config"]["augment"] is True  # on by default with --shots
    # every shot trains (none held out); the threshold comes from 8 augmented views of each shot
    assert meta["training"]["n_train_images"] == 4 and meta["training"]["n_calibration_images"] == 4
    assert meta["training"]["calibration_set"] == "augmented views of the shots"
    assert meta["training"]["calibration_views"] == 8 and meta["calibration"]["n_normal"] == 32
    r = run("train", tiny_tile, "--out", out, "--shots", "999", "--no-progress")
    assert r.returncode == 2 and "only 12 normal training images" in r.stderr
