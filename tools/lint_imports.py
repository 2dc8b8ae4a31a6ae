"""import-linter on the package as it installs.

``components/`` and ``pipelines/`` sit at the repository's top level but install as
``recontrast_core.components`` and ``recontrast_core.pipelines`` (pyproject's
``package-dir``); import-linter reads packages from disk and cannot follow that mapping.
This copies the tree into a temporary folder laid out as the wheel lays it out and runs
``lint-imports`` there with the repository's contracts.

    python tools/lint_imports.py          # exit code: lint-imports' own
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"components": "recontrast_core/components", "pipelines": "recontrast_core/pipelines"}


def installed_layout(dst: Path, repo: Path = REPO) -> Path:
    """``dst`` holding recontrast_core (with components/ and pipelines/ inside) and pyproject.toml."""
    ignore = shutil.ignore_patterns("__pycache__", "compiled")
    shutil.copytree(repo / "recontrast_core", dst / "recontrast_core", ignore=ignore)
    for src, rel in MAPPED.items():
        shutil.copytree(repo / src, dst / rel, ignore=ignore)
    shutil.copy(repo / "pyproject.toml", dst / "pyproject.toml")
    return dst


def lint(root: Path, exe: str | None = None) -> subprocess.CompletedProcess:
    exe = exe or str(Path(sys.executable).with_name("lint-imports"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="recontrast-lint-") as tmp:
        res = lint(installed_layout(Path(tmp)))
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    return res.returncode


if __name__ == "__main__":
    raise SystemExit(main())
