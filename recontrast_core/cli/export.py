"""``recontrast export BUNDLE --format onnx|openvino --out DIR``: the whole scoring graph.

The exported model takes ``image`` uint8 [N,3,S,S] (RGB, resized to the bundle's size) and
returns ``anomaly_map``, ``score``, ``normalized_score`` and ``decision``; normalisation,
blur, image score and calibration are inside (see :mod:`recontrast_core.export`).
Bad input (not a bundle, unknown format, unwritable folder, the ``export`` extra missing)
exits with code 2 and one line.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from .common import EXIT_USER_ERROR, console, emit_json, summary_table


def export_command(
    bundle: Path = typer.Argument(..., help="Model bundle folder (from `recontrast train`)"),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | openvino"),
    out: Path = typer.Option(Path("runs/export"), "--out", "-o",
                             help="Output folder: model.onnx (or model.xml + model.bin) and export.json"),
    json_out: bool = typer.Option(False, "--json", help="Print the export metadata on stdout"),
) -> None:
    """Export the bundle's whole scoring graph (encoders, decoder, anomaly map, blur, score,
    calibrated normalisation) to ONNX or OpenVINO, with the preprocessing in its metadata."""
    from rich.markup import escape

    from ..export import META_FILE, export_bundle
    from ..runtime import read_json

    try:
        path = export_bundle(bundle, out, fmt.lower())
    except UserError as exc:  # as common.user_errors, escaped: the message names 'recontrast[export]'
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    meta = read_json(Path(out) / META_FILE) or {}
    console.print(summary_table("export", {
        "model": str(path), "format": fmt.lower(), "image_size": meta.get("image_size"),
        "input": "image: uint8 [N,3,S,S] RGB", "outputs": ", ".join(meta.get("output_names", [])),
        "threshold": meta.get("threshold"),
    }))
    if json_out:
        emit_json({"model": str(path), **meta})
