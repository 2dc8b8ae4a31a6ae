"""Compile a pipeline function to KFP IR YAML (one helper for every pipeline of the project)."""

import os
from pathlib import Path

from kfp import compiler


def compile_to(pipeline_func, path: os.PathLike | str) -> Path:
    """Write ``pipeline_func``'s KFP IR YAML to ``path`` (parents created); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=pipeline_func, package_path=str(path))
    return path
