"""The import contract in pyproject.toml holds (import-linter, on the package as it installs:
tools/lint_imports.py), it is complete (every module of recontrast_core sits in a layer, the
core's purity list is the core layer), and it catches wrong-way imports: the same check on a
copy of the tree with one planted import fails. Benchmarks use only public names."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require_dev_tool

sys.path.insert(0, str(REPO_ROOT / "tools"))
from lint_imports import installed_layout, lint  # noqa: E402

LINT_EXE = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path):
    # import-linter is in the dev extra: where it is missing the test fails, it does not skip
    return lint(root, require_dev_tool(LINT_EXE, "import-linter"))


def _contracts() -> list[dict]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_layers_import_downward_only(tmp_path: Path) -> None:
    res = _lint(installed_layout(tmp_path))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_the_contract_is_complete() -> None:
    """The layers contract is exhaustive (lint-imports fails on a module in no layer), and the
    core layer and the purity contract's sources name the same modules."""
    layers, pure = _contracts()[0], _contracts()[1]
    assert layers["exhaustive"] is True and layers["containers"] == ["recontrast_core"]
    core = {f"recontrast_core.{m.strip()}" for m in layers["layers"][-1].split(":")}
    assert core == set(pure["source_modules"])
    assert {"typer", "rich", "click"} <= set(pure["forbidden_modules"])
    on_disk = {p.stem if p.suffix == ".py" else p.name for p in (REPO_ROOT / "recontrast_core").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    declared = {m.strip() for layer in layers["layers"] for m in layer.split(":")} | set(layers["exhaustive_ignores"])
    assert on_disk <= declared | {"components", "pipelines"}, on_disk - declared


@pytest.mark.parametrize("planted, code, contract", [
    # a new core module nobody put in a layer, importing an adapter
    ("recontrast_core/new_feature.py", "from recontrast_core.mlops import storage\n", "Layers"),
    ("recontrast_core/metrics.py", "from recontrast_core.steps import artifacts\n", "The core is pure ML"),
    ("recontrast_core/scoring.py", "import typer\n", "The core is pure ML"),  # a CLI library in the core
    ("recontrast_core/mlops/storage.py", "from recontrast_core.steps import artifacts\n", "Layers"),  # upward
])
def test_a_wrong_way_import_breaks_the_contract(tmp_path: Path, planted: str, code: str, contract: str) -> None:
    root = installed_layout(tmp_path)
    target = root / planted
    target.write_text((target.read_text() if target.exists() else '"""planted"""\n') + "\n" + code)
    res = _lint(root)
    assert res.returncode != 0
    assert contract in res.stdout and "BROKEN" in res.stdout, res.stdout[-3000:]


def _private_uses(path: Path) -> list[str]:
    """``from recontrast_core... import _x`` and ``<module imported from recontrast_core>._x``."""
    tree = ast.parse(path.read_text(), str(path))
    ours: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recontrast_core"):
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{a.name}")
                ours.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("recontrast_core"):
                    ours.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in ours):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_benchmarks_use_only_public_names() -> None:
    bad = [hit for f in sorted((REPO_ROOT / "benchmarks").glob("*.py")) for hit in _private_uses(f)]
    assert not bad, bad


def test_the_private_name_check_catches_one(tmp_path: Path) -> None:
    f = tmp_path / "b.py"
    f.write_text("from recontrast_core.mlops import registry\nfrom recontrast_core.train import _x\n"
                 "registry._helper(1)\n")
    assert len(_private_uses(f)) == 2
