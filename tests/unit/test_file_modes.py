"""Artifacts honour the umask: 0644 files and 0755 folders under umask 022 (a server or pod
running as another user reads what a step wrote on a shared volume), 0600 under 077."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from recontrast_core.config import ModelConfig, TrainConfig
from recontrast_core.data.layouts import read_mvtec
from recontrast_core.fit import fit_detector
from recontrast_core.predict import predict_paths
from recontrast_core.runtime import atomic_write_json
from tests.conftest import build_tiny_mvtec


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda m: os.umask(m)
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_bundle_and_predict_outputs_are_0644_under_umask_022(tmp_path: Path, umask) -> None:
    data = build_tiny_mvtec(tmp_path / "ds", n_train=8, n_test_good=2, defects={"crack": 2}, size=(64, 64))
    m = read_mvtec(data)
    small = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu")
    bundle = fit_detector(m, ModelConfig(kind="patchknn", patchknn={"image_size": 64, "fraction": 0.3}), small,
                          tmp_path / "out", progress=False).bundle_dir
    out = tmp_path / "pred"
    predict_paths(bundle, [str(p) for p in m.select(split="test").image_paths()], out_dir=out, overlays=True,
                  progress=False)
    for root in (bundle, out):
        modes = _modes(root)
        files = {k: v for k, v in modes.items() if not (root / k).is_dir() and k != "."}
        dirs = {k: v for k, v in modes.items() if (root / k).is_dir()}
        assert files and all(v == 0o644 for v in files.values()), files
        assert all(v == 0o755 for v in dirs.values()), dirs
    assert any("overlays" in k for k in _modes(out))


def test_a_strict_umask_is_honoured_too(tmp_path: Path, umask) -> None:
    umask(0o077)
    p = atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    umask(0o022)
    p = atomic_write_json(tmp_path / "y.json", {"a": 1})
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_an_export_that_fails_midway_leaves_no_marker_and_no_half_file(tmp_path: Path, umask, monkeypatch) -> None:
    """export.json is the completion marker: written last, removed first; model.onnx goes
    through a temporary file (a failure while writing it leaves the old file or none)."""
    import recontrast_core.export as ex
    from recontrast_core.errors import UserError  # noqa: F401

    data = build_tiny_mvtec(tmp_path / "ds", n_train=8, size=(64, 64))
    small = TrainConfig(image_size=64, iterations=2, batch_size=4, decoder_blocks=(1, 1, 1), bottleneck_blocks=1,
                        device="cpu")
    bundle = fit_detector(read_mvtec(data), ModelConfig(kind="patchknn", patchknn={"image_size": 64, "fraction": 0.3}),
                          small, tmp_path / "out", progress=False).bundle_dir
    out = tmp_path / "export"
    ex.export_bundle(bundle, out, "onnx")
    assert {p.name for p in out.iterdir()} == {"model.onnx", "export.json"}
    assert stat.S_IMODE((out / "model.onnx").stat().st_mode) == 0o644

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex.torch.onnx, "export", disk_full)
    from recontrast_core.errors import DiskFullError

    with pytest.raises(DiskFullError, match="model.onnx: cannot write, no space left on device"):
        ex.export_bundle(bundle, out, "onnx")
    assert {p.name for p in out.iterdir()} == {"model.onnx"}  # the old graph, no marker, no temp file
