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
