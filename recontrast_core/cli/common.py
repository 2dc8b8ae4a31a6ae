"""Shared pieces of the `recontrast` command line: console, error handling, output.

Every command body runs inside :func:`user_errors`, so a :class:`UserError` becomes one
red line on stderr and exit code 2 (no traceback); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UserError

console = Console(stderr=True)  # human output on stderr; --json on stdout

EXIT_USER_ERROR = 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except Exception as exc:  # a full disk or a tracking server failing mid-command is no bug: one line
        from ..mlops.tracking_store import server_failure
        from ..runtime import disk_full_message

        line = disk_full_message(exc) or server_failure(exc)
        if line is None:
            raise
        console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
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


def settings_from(params: Optional[Path], flags: dict[str, Any], sets: Optional[list[str]] = None):
    """The command's settings: ``params`` (a params.yaml / PipelineConfig file, or the
    defaults), then the common flags given (dotted keys; None = not given), then ``--set
    KEY=VALUE`` items: one :class:`~recontrast_core.config.PipelineConfig` through the one
    override function."""
    from ..steps.settings import apply_overrides, load_settings

    cfg = load_settings(params, {k: v for k, v in flags.items() if v is not None})
    return apply_overrides(cfg, sets or []) if sets else cfg


def read_validated_dataset(dataset, layout: str = "auto", progress: bool = True, *, allow_duplicates: bool = False,
                           **layout_options):
    """Read a dataset folder (any layout) and validate every file before any work; warnings
    go to the console. (Steps read ingest outputs with ``steps.artifacts.load_manifest``.)"""
    from ..data.layouts import read_dataset

    return validate_with_warnings(read_dataset(dataset, layout=layout, **layout_options), progress,
                                  allow_duplicates=allow_duplicates)


def validate_with_warnings(manifest, progress: bool = True, *, allow_duplicates: bool = False):
    """Validate every file of ``manifest`` (raises naming the file); print the warnings."""
    from ..data.validate import validate_manifest

    report = validate_manifest(manifest, progress=progress, allow_duplicates=allow_duplicates)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    return manifest


def layout_options(layout: str, *, abnormal_dir=None, mask_dir=None, normal_label: Optional[str] = None,
                   annotations=None, images=None, split_csv=None, items: Optional[list[str]] = None) -> dict[str, Any]:
    """The layout options given on the command line: the folder layout's ``--abnormal-dir``
    / ``--mask-dir`` (only with ``--layout folder``, as before), ``--normal-label``,
    ``--annotations``, ``--images``, ``--split-csv`` (paths made absolute: they are
    relative to the current folder here) and ``--layout-option KEY=VALUE`` items."""
    from ..errors import UserError

    opts: dict[str, Any] = {}
    if layout == "folder":
        opts.update({k: v for k, v in (("abnormal_dir", abnormal_dir), ("mask_dir", mask_dir)) if v is not None})
    for key, value in (("annotations", annotations), ("images", images), ("split_csv", split_csv)):
        if value is not None:
            opts[key] = str(Path(value).resolve())
    if normal_label is not None:
        opts["normal_label"] = normal_label
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--layout-option takes KEY=VALUE, not {item!r}")
        opts[key.strip()] = value
    return opts


def layout_option():
    return typer.Option([], "--layout-option", metavar="KEY=VALUE",
                        help="Any layout option (docs/data.md), e.g. test_fraction=0.3, split=hash; repeatable")


def set_option():
    return typer.Option([], "--set", metavar="KEY=VALUE",
                        help="Override any setting by its dotted key (train.lr_decoder=1e-3); repeatable")


def params_option():
    return typer.Option(None, "--config", "--params",
                        help="Settings file: a params.yaml (serialised PipelineConfig); flags and --set override it")
