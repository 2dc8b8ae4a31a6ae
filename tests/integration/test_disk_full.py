"""A full disk at every write point (issue 17, cases 1-2).

Every output the tool writes goes through one path (``runtime.atomic_write`` /
``runtime.staged_write``) that counts writes; ``RECONTRAST_FAILPOINT_ENOSPC_AT=N`` makes the
Nth write of the process raise ``OSError(ENOSPC)`` as a full disk would. Each command is
run once cleanly with ``RECONTRAST_WRITE_LOG`` to list its write points, then once per
write point with the failpoint there. Each failing run must: exit 2 with one ``error:``
line naming the file ("no space left on device"), no traceback; leave no temporary file
or folder; leave its output folder marked not complete (the next step refuses it); and,
for evaluate, leave no metrics.json that the register step would accept.

The commands run in this process (typer's CliRunner, as the other CLI tests) so that the
suite stays fast; ``benchmarks/faults.py --disk-full`` runs the same through real
processes, and into a real full tmpfs where it may mount one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recontrast_core import runtime
from recontrast_core.filenames import STEP_MARKER_FILE
from tests.conftest import build_tiny_mvtec

pytestmark = pytest.mark.timeout(600)

TINY = ["--image-size", "64", "--device", "cpu", "--no-progress", "--set", "model.patchknn.image_size=64",
        "--set", "model.patchknn.fraction=0.3"]


def _invoke(args: list[str]):
    from recontrast_core.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _write_points(monkeypatch, tmp_path: Path, args: list[str]) -> list[str]:
    """The targets written by a clean run of ``args``, in order."""
    log = tmp_path / "writes.log"
    log.unlink(missing_ok=True)
    monkeypatch.setenv(runtime.WRITE_LOG_ENV, str(log))
    monkeypatch.delenv(runtime.FAILPOINT_ENOSPC_ENV, raising=False)
    runtime.reset_write_points()
    result = _invoke(args)
    monkeypatch.delenv(runtime.WRITE_LOG_ENV)
    assert result.exit_code == 0, result.output
    return [line.split("\t", 1)[1] for line in log.read_text().splitlines()]


def _fail_at(monkeypatch, n: int, args: list[str]):
    monkeypatch.setenv(runtime.FAILPOINT_ENOSPC_ENV, str(n))
    runtime.reset_write_points()
    try:
        return _invoke(args)
    finally:
        monkeypatch.delenv(runtime.FAILPOINT_ENOSPC_ENV)


def _assert_one_disk_full_line(result, target: str) -> None:
    assert result.exit_code == 2, (target, result.output)
    text = result.output
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    assert "no space left on device" in errors[0], errors[0]
    assert Path(target).name in text.replace("\n", ""), (target, text)


def _temporaries(root: Path) -> list[Path]:
    """Temporary files and staging folders anywhere under ``root``."""
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".part")) or ".tmp." in p.name
            or p.name.startswith(".overlays.") or p.name.endswith(".old")]


def _marker_status(out: Path):
    marker = out / STEP_MARKER_FILE
    return json.loads(marker.read_text())["status"] if marker.is_file() else None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_tiny_mvtec(tmp_path_factory.mktemp("disk") / "ds", n_train=8, n_test_good=2, size=(64, 64))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "train"
    result = _invoke(["train", dataset, "--out", out, "--kind", "patchknn", *TINY])
    assert result.exit_code == 0, result.output
    return out


def _check_every_point(monkeypatch, tmp_path, make_args, check=None) -> int:
    clean = tmp_path / "clean"
    points = _write_points(monkeypatch, tmp_path, make_args(clean))
    assert points, "no write points recorded"
    for n, target in enumerate(points, start=1):
        out = tmp_path / f"fail{n}"
        target_here = target.replace(str(clean), str(out))
        result = _fail_at(monkeypatch, n, make_args(out))
        _assert_one_disk_full_line(result, target_here)
        assert not _temporaries(out), (n, target, _temporaries(out))
        assert _marker_status(out) != "complete", (n, target)
        if check is not None:
            check(out, n, target)
        shutil.rmtree(out, ignore_errors=True)
    return len(points)


def test_train_at_every_write_point(monkeypatch, tmp_path, dataset):
    """Train (ReContrast, checkpoints every iteration): the checkpoint, the bundle's two
    files and the markers each fail clean; the next step refuses the folder."""
    def args(out):
        return ["train", dataset, "--out", out, "--kind", "recontrast", "--iterations", "2", "--batch-size", "4",
                "--set", "train.decoder_blocks=[1,1,1]", "--set", "train.bottleneck_blocks=1",
                "--set", "train.checkpoint_every=1", *TINY]

    def check(out, n, target):
        if (out / "bundle" / "bundle.json").is_file():  # failed after the bundle: refused downstream
            r = _invoke(["evaluate", out, dataset, "--out", out.parent / f"eval{n}", "--device", "cpu",
                         "--no-progress"])
            assert r.exit_code == 2 and "did not finish" in r.output, r.output

    n = _check_every_point(monkeypatch, tmp_path, args, check)
    assert n >= 5  # markers (2), checkpoints, weights, bundle.json


def test_evaluate_at_every_write_point(monkeypatch, tmp_path, dataset, trained):
    """Evaluate: no metrics.json, scores or plots left from a failed run, and register
    refuses its folder."""
    def args(out):
        return ["evaluate", trained, dataset, "--out", out, "--device", "cpu", "--no-progress"]

    def check(out, n, target):
        assert not (out / "metrics.json").exists(), (n, target)
        assert not (out / "scores.csv").exists(), (n, target)
        assert not list((out / "plots").glob("*.png")) if (out / "plots").is_dir() else True
        if (out / STEP_MARKER_FILE).is_file():
            from recontrast_core.errors import UserError
            from recontrast_core.steps.register import register

            (out / "metrics.json").write_text(json.dumps({"metrics": {"image_auroc": 1.0}}))  # a leftover
            with pytest.raises(UserError, match="did not finish"):
                register(trained, out / "metrics.json")

    n = _check_every_point(monkeypatch, tmp_path, args, check)
    assert n >= 6


def test_predict_at_every_write_point(monkeypatch, tmp_path, dataset, trained):
    """Predict with overlays: no results table without its overlays, no staging folder."""
    images = dataset / "test"

    def args(out):
        return ["predict", trained / "bundle", images, "--out", out, "--device", "cpu", "--no-progress"]

    def check(out, n, target):
        assert not (out / "overlays").exists() or (out / "results.csv").exists()

    assert _check_every_point(monkeypatch, tmp_path, args, check) >= 4


def test_export_at_every_write_point(monkeypatch, tmp_path, trained):
    """Export: no export.json (the completion marker) and no model file without it."""
    pytest.importorskip("onnx")

    def args(out):
        return ["export", trained / "bundle", "--out", out, "--format", "onnx"]

    def check(out, n, target):
        assert not (out / "export.json").exists(), (n, target)

    assert _check_every_point(monkeypatch, tmp_path, args, check) >= 2


def test_batch_scoring_at_every_write_point(monkeypatch, tmp_path, dataset, trained):
    """Batch scoring (local parts and overlays): whole parts only, no merged table from a
    failed run, and a rerun with space finishes with every image exactly once."""
    from recontrast_core.errors import DiskFullError
    from recontrast_core.mlops.batch_scoring import run_batch_scoring

    images = [str(dataset / "test")]
    log = tmp_path / "writes.log"
    monkeypatch.setenv(runtime.WRITE_LOG_ENV, str(log))
    runtime.reset_write_points()
    run_batch_scoring(str(trained / "bundle"), images, str(tmp_path / "clean"), chunk_size=2, overlays=True,
                      device="cpu", progress=False)
    monkeypatch.delenv(runtime.WRITE_LOG_ENV)
    n_points = len(log.read_text().splitlines())
    assert n_points >= 4
    for n in range(1, n_points + 1):
        out = tmp_path / f"fail{n}"
        monkeypatch.setenv(runtime.FAILPOINT_ENOSPC_ENV, str(n))
        runtime.reset_write_points()
        with pytest.raises(DiskFullError, match="no space left on device"):
            run_batch_scoring(str(trained / "bundle"), images, str(out), chunk_size=2, overlays=True, device="cpu",
                              progress=False)
        monkeypatch.delenv(runtime.FAILPOINT_ENOSPC_ENV)
        assert not _temporaries(out), (n, _temporaries(out))
        assert not (out / "results.parquet").exists() or not (out / "results.csv").exists()
        summary = run_batch_scoring(str(trained / "bundle"), images, str(out), chunk_size=2, overlays=True,
                                    device="cpu", progress=False)  # the rerun, with space again
        import pandas as pd

        table = pd.read_parquet(out / "results.parquet")
        assert table["key"].is_unique if "key" in table else table.iloc[:, 0].is_unique
        assert len(table) == summary["images"] if "images" in summary else True
        shutil.rmtree(out, ignore_errors=True)
