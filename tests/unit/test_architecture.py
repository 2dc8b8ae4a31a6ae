"""The layer contract in pyproject.toml holds (import-linter), and it does catch a
wrong-way import: the same check on a copy of the tree with one planted import fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LINT = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT.is_file(), reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_layers_import_downward_only() -> None:
    res = _lint(REPO_ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "broken" in res.stdout and "0 broken" in res.stdout


@pytest.mark.parametrize("planted, contract", [
    ("recontrast_core/metrics.py", "The core is pure ML"),  # core -> an adapter
    ("recontrast_core/mlops/storage.py", "Layers"),  # mlops -> steps (upward)
])
def test_a_wrong_way_import_breaks_the_contract(tmp_path: Path, planted: str, contract: str) -> None:
    for name in ("recontrast_core", "components", "pipelines"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / planted
    target.write_text(target.read_text() + "\nfrom recontrast_core.steps import artifacts  # planted\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert f"{contract}" in res.stdout and "BROKEN" in res.stdout, res.stdout[-3000:]
