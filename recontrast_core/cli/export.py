"""``recontrast export BUNDLE --format FORMAT --out DIR``: the whole scoring graph.

The exported model takes ``image`` uint8 [N,3,S,S] (RGB, resized to the bundle's size) and
returns ``anomaly_map``, ``score``, ``normalized_score`` and ``decision``; normalisation,
blur, image score and calibration are inside (see :mod:`recontrast_core.export`).
``onnx-int8`` / ``openvino-int8`` quantize the feature networks to INT8 (NNCF post-training
quantization) on normal training images given by ``--calibration-data``; same inputs and
outputs. Bad input (not a bundle, unknown format, unwritable folder, missing or unusable
calibration data, the ``export`` extra missing) exits with code 2 and one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import EXIT_USER_ERROR, console, emit_json, summary_table


def export_command(
    bundle: Path = typer.Argument(..., help="Model bundle folder (from `recontrast train`)"),
    fmt: str = typer.Option("onnx", "--format", "-f",
                            help="onnx | openvino (fp32) | onnx-int8 | openvino-int8 (INT8, needs --calibration-data)"),
    out: Path = typer.Option(Path("runs/export"), "--out", "-o",
                             help="Output folder: model.onnx (or model.xml + model.bin) and export.json"),
    calibration_data: Optional[Path] = typer.Option(
        None, "--calibration-data",
        help="INT8 formats: the bundle's dataset root (its normal training images are used) or a folder of "
             "normal training images"),
    calibration_images: int = typer.Option(128, "--calibration-images",
                                           help="INT8 formats: at most this many calibration images (evenly spaced)"),
    json_out: bool = typer.Option(False, "--json", help="Print the export metadata on stdout"),
) -> None:
    """Export the bundle's whole scoring graph (encoders, decoder, anomaly map, blur, score,
    calibrated normalisation) to ONNX or OpenVINO, fp32 or INT8, with the preprocessing in its
    metadata."""
    from rich.markup import escape

    from ..export import META_FILE, export_bundle
    from ..runtime import read_json

    try:
        path = export_bundle(bundle, out, fmt.lower(), calibration_data=calibration_data,
                             calibration_images=calibration_images)
    except UserError as exc:  # as common.user_errors, escaped: the message names 'recontrast[export]'
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    meta = read_json(Path(out) / META_FILE) or {}
    rows = {
        "model": str(path), "format": fmt.lower(), "image_size": meta.get("image_size"),
        "input": "image: uint8 [N,3,S,S] RGB", "outputs": ", ".join(meta.get("output_names", [])),
        "threshold": meta.get("threshold"),
    }
    quant = meta.get("quantization")
    if isinstance(quant, dict):
        rows["calibration"] = f"{quant.get('calibration_images')} images from {quant.get('calibration_data')}"
    console.print(summary_table("export", rows))
    if json_out:
        emit_json({"model": str(path), **meta})
