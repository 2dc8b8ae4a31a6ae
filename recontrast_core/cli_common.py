"""Shared pieces of the `recontrast` command line: console, error handling, output.

Every command body runs inside :func:`user_errors`, so a :class:`UserError` becomes one
red line on stderr and exit code 2 (no traceback); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

import typer
from rich.table import Table

from .errors import UserError
from .progress import stderr_console as console  # human output on stderr; --json on stdout

EXIT_USER_ERROR = 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(str(key), f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def config_with_overrides(model, config_path, section: str, overrides: dict):
    """A config model from an optional YAML file's ``section`` plus non-None flag overrides.

    ``overrides["backbone"]`` (a dict) is merged into the nested backbone settings.
    Invalid values become a one-line UserError naming the field.
    """
    from pydantic import ValidationError

    from .config import load_yaml_config

    cfg = load_yaml_config(config_path, model, section=section) if config_path else model()
    data = cfg.model_dump()
    backbone = {k: v for k, v in (overrides.pop("backbone", None) or {}).items() if v is not None}
    if backbone:
        data["backbone"].update(backbone)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def read_validated_dataset(dataset, layout: str = "auto", progress: bool = True, **layout_options):
    """Read a dataset and validate every file before any work; warnings go to the console."""
    from .data.layouts import read_dataset

    return validate_with_warnings(read_dataset(dataset, layout=layout, **layout_options), progress)


def validate_with_warnings(manifest, progress: bool = True):
    """Validate every file of ``manifest`` (raises naming the file); print the warnings."""
    from .data.validate import validate_manifest

    report = validate_manifest(manifest, progress=progress)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    return manifest
