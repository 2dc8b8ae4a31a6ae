"""The `recontrast` command as a user runs it: real images, exit codes, --json."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert "training-free baseline" in r.stderr and "baseline_image_auroc" in metrics  # beside every evaluation
    assert {"roc.png", "pr.png", "overlay_grid.png"} <= {p.name for p in (tmp_path / "eval" / "plots").iterdir()}

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
        (["train", "{bad}", "--image-size", "48"], "multiple of 32"),
        (["train", "{bad}", "--set", "train.imagesize=64"], "did you mean train.image_size"),
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
            "--batch-size", "4", "--kind", "recontrast", "--no-progress")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "bundle" / "bundle.json").read_text())
    assert meta["train_config"]["augment"] is True  # on by default with --shots
    # every shot trains (none held out); the threshold comes from 8 augmented views of each shot
    assert meta["training"]["n_train_images"] == 4 and meta["training"]["n_calibration_images"] == 4
    assert meta["training"]["calibration_set"] == "augmented views of the shots"
    assert meta["training"]["calibration_views"] == 8 and meta["calibration"]["n_normal"] == 32
    r = run("train", tiny_tile, "--out", out, "--shots", "999", "--no-progress")
    assert r.returncode == 2 and "only 12 normal training images" in r.stderr


def test_output_folder_is_checked_before_any_work(tiny_tile, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run("train", tiny_tile, "--out", blocker, "--image-size", "64", "--iterations", "2", "--no-progress")
    assert r.returncode == 2 and "is an existing file, not a folder" in r.stderr and "Traceback" not in r.stderr
    # a folder that cannot be created or written (here: below a file; a read-only mount
    # behaves the same, and root ignores permission bits, so chmod cannot show it)
    r = run("train", tiny_tile, "--out", blocker / "run", "--image-size", "64", "--no-progress")
    assert r.returncode == 2 and "is not writable" in r.stderr and "Traceback" not in r.stderr


def test_broken_bundles_weights_and_unreadable_images(tiny_tile, tmp_path):
    """Every file the tool reads itself gets one line naming it and exit 2; prediction
    scores the readable images and lists the unreadable ones."""
    import shutil

    out = tmp_path / "run"
    assert run("train", tiny_tile, "--out", out, "--image-size", "64", "--iterations", "1", "--batch-size", "4",
               "--no-progress").returncode == 0
    good = out / "bundle"

    def broken(name, edit):
        b = tmp_path / name
        shutil.copytree(good, b)
        edit(b)
        return b

    cases = {
        broken("json", lambda b: (b / "bundle.json").write_text("{ not json")): "bundle.json: not valid JSON",
        broken("trunc", lambda b: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:1000])):
            "model.safetensors: cannot read the model weights: corrupt or truncated",
        broken("calib", lambda b: (b / "bundle.json").write_text(
            (b / "bundle.json").read_text().replace('"threshold": ', '"threshold": -1e9, "_x": '))):
            "bundle.json: invalid calibration",
    }
    for bundle, message in cases.items():
        r = run("predict", bundle, tiny_tile / "test" / "crack", "--out", tmp_path / "p", "--no-progress")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (message, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1

    corrupt = tmp_path / "w.pth"
    corrupt.write_bytes(b"\x80\x02 not a state dict")
    r = run("train", tiny_tile, "--out", tmp_path / "w", "--weights", corrupt, "--image-size", "64", "--no-progress")
    assert r.returncode == 2 and "w.pth: cannot read the weights: corrupt or truncated" in r.stderr
    assert "weights_only=False" not in r.stderr and "Traceback" not in r.stderr

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_tile / "test" / "crack", mixed)
    (mixed / "zz_broken.png").write_bytes(b"\x89PNG truncated")
    (mixed / "aa_empty.jpg").write_bytes(b"")
    r = run("predict", good, mixed, "--out", tmp_path / "pred", "--no-progress", "--json")
    assert r.returncode == 3, r.stderr  # finished; some images unreadable
    rows = json.loads(r.stdout)
    assert len(rows) == 5
    bad = {Path(x["path"]).name: x["error"] for x in rows if x["error"]}
    assert set(bad) == {"zz_broken.png", "aa_empty.jpg"} and all(bad.values())
    assert all(x["score"] is not None for x in rows if not x["error"])
    assert "zz_broken.png" in r.stderr and "aa_empty.jpg" in r.stderr
    table = (tmp_path / "pred" / "results.csv").read_text()
    assert "zz_broken.png" in table and table.count("\n") == 6
    assert len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == 3
    assert not list((tmp_path / "pred").glob(".overlays.*"))  # no staging left behind
