"""The wheel: everything under the project's own package name (components/ and pipelines/
install as recontrast_core.components and recontrast_core.pipelines), every package of the
tree in it, the packaged profiles too."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(600)


def test_the_wheel_installs_nothing_but_recontrast_core(tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"  # built from a copy: setuptools writes build/ beside the sources
    for name in ("recontrast_core", "components", "pipelines"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                         capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = tmp_path.glob("recontrast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"recontrast_core"}, top  # no top-level components/ or pipelines/
    packages = {str(p.parent.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "recontrast_core").rglob("__init__.py")}
    packages |= {"recontrast_core/components", "recontrast_core/pipelines"}
    in_wheel = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert packages <= in_wheel, packages - in_wheel  # pyproject's package list misses none
    for f in ("recontrast_core/pipelines/training_pipeline.py", "recontrast_core/components/factory.py",
              "recontrast_core/profiles/cpu.yaml", "recontrast_core/profiles/demo.yaml"):
        assert f in names, f
