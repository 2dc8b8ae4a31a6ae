"""``recontrast serve``: bad input exits 2 with one line; without kserve the command stays
listed and says which extra to install (real subprocesses of the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)

BLOCK_KSERVE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kserve" or name.startswith("kserve."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
from recontrast_core.cli import main
sys.argv = ["recontrast", *sys.argv[1:]]
main()
"""


def _run(args: list[str], tmp_path, code: str = "from recontrast_core.cli import main; import sys; "
                                                 "sys.argv = ['recontrast', *sys.argv[1:]]; main()"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=150,
                          cwd=tmp_path, env=env)


@pytest.mark.parametrize("args, message", [
    (["--model", "recontrast@champion"], "--model takes models:/NAME@ALIAS or models:/NAME/VERSION"),
    (["--model", "models:/m@champion", "--port", "0"], "--port must be 1..65535"),
    (["--model", "models:/m@champion", "--poll-s", "-1"], "--poll-s must be >= 0"),
    (["--model", "models:/m@champion", "--name", "a/b"], "--name may hold"),
    (["--model", "models:/nope@champion", "--tracking-uri", "sqlite:///reg.db"], "no registered model named 'nope'"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    pytest.importorskip("kserve")
    proc = _run(["serve", *args], tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_kserve_the_command_explains_itself(tmp_path):
    proc = _run(["serve", "--model", "models:/m@champion"], tmp_path, BLOCK_KSERVE)
    assert proc.returncode == 2, proc.stderr
    assert "`recontrast serve` needs the serve,pipeline extra (pip install 'recontrast[serve,pipeline]')" in proc.stderr
    listed = _run(["--help"], tmp_path, BLOCK_KSERVE)
    assert listed.returncode == 0 and "unavailable: install recontrast[serve]" in listed.stdout
