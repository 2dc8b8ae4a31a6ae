"""Issue 17, cases 7 and 8: an image symlink inside a dataset that points outside it is
refused (one message naming it, listed by `data check`); a killed predict's hidden staging
folder is removed by the next run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recontrast_core.cli import app
from recontrast_core.data.layouts import read_mvtec
from recontrast_core.data.validate import validate_manifest
from recontrast_core.errors import DataValidationError
from tests.conftest import build_tiny_mvtec, write_image


def test_a_symlink_leaving_the_dataset_is_refused_and_listed(tmp_path: Path) -> None:
    data = build_tiny_mvtec(tmp_path / "ds")
    outside = write_image(tmp_path / "secret" / "outside.png", seed=99)
    victim = data / "train" / "good" / "001.png"
    victim.unlink()
    os.symlink(outside, victim)
    with pytest.raises(DataValidationError, match="symlink that leaves the dataset root"):
        validate_manifest(read_mvtec(data))
    res = CliRunner().invoke(app, ["data", "check", str(data)])
    assert res.exit_code == 2, res.output
    assert "001.png" in res.output and "leaves the dataset root" in res.output
    assert "Traceback" not in res.output


def test_a_symlink_inside_the_dataset_is_fine(tmp_path: Path) -> None:
    data = build_tiny_mvtec(tmp_path / "ds")
    victim = data / "train" / "good" / "001.png"
    target = data / "train" / "good" / "000.png"
    victim.unlink()
    os.symlink(target, victim)
    validate_manifest(read_mvtec(data), allow_duplicates=True)  # same bytes twice: allowed here


def test_a_killed_predicts_staging_folder_is_removed_next_run(tmp_path: Path) -> None:
    from recontrast_core.config import ModelConfig, TrainConfig
    from recontrast_core.fit import fit_detector
    from recontrast_core.predict import predict_paths

    data = build_tiny_mvtec(tmp_path / "ds", n_train=8, size=(64, 64))
    m = read_mvtec(data)
    small = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu")
    bundle = fit_detector(m, ModelConfig(kind="patchknn", patchknn={"image_size": 64, "fraction": 0.3}), small,
                          tmp_path / "out", progress=False).bundle_dir
    out = tmp_path / "pred"
    stale = out / ".overlays.abc123"  # what kill -9 leaves behind
    stale.mkdir(parents=True)
    (stale / "00000_x.png").write_bytes(b"png")
    predict_paths(bundle, [str(p) for p in m.select(split="test").image_paths()], out_dir=out, progress=False)
    assert not stale.exists()
    from recontrast_core.filenames import STEP_MARKER_FILE

    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [STEP_MARKER_FILE]


def test_a_second_writer_into_one_output_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    """Two runs into one --out: the second is refused naming the folder and the holder's pid
    (a lock the OS drops with its process: nothing stale after kill -9)."""
    import subprocess
    import sys
    import time

    from recontrast_core.errors import UserError
    from recontrast_core.runtime import LOCK_FILE, output_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from recontrast_core.runtime import output_lock\n"
        f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another recontrast run \(pid {holder.pid}\)"):
            with output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with output_lock(out):  # the killed holder left nothing that blocks
        assert (out / LOCK_FILE).is_file()
    assert not (out / LOCK_FILE).exists()  # a finished run leaves its outputs only


def test_two_trainings_into_one_out_dir_the_second_is_one_line(tmp_path: Path) -> None:
    from recontrast_core.config import ModelConfig, TrainConfig
    from recontrast_core.errors import UserError
    from recontrast_core.fit import fit_detector

    m = read_mvtec(build_tiny_mvtec(tmp_path / "ds", n_train=8, size=(64, 64)))
    small = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu")
    out = tmp_path / "run"
    out.mkdir()
    # another process holds the folder, as a running `recontrast train --out run` would
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('4242'); f.flush(); print('held', flush=True); time.sleep(60)"), str(out / ".recontrast.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="training output folder in use"):
            fit_detector(m, ModelConfig(kind="patchknn", patchknn={"image_size": 64}), small, out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert fit_detector(m, ModelConfig(kind="patchknn", patchknn={"image_size": 64, "fraction": 0.3}), small, out,
                        progress=False).bundle_dir.is_dir()
