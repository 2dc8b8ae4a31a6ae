"""``recontrast data check``: read a dataset in any layout, run every check, print a report.

The report (images per split and defect type, normal and anomalous counts, masks and their
coverage, image sizes and modes, duplicates, warnings, problems) is
:func:`recontrast_core.data.report.check_dataset`'s, the same that the ingest step writes
as ``dataset_card.json``. Exit code 2 when the data cannot be trained on (the problems are
listed, each naming its file); ``--json`` prints the report on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import EXIT_USER_ERROR, console, emit_json, layout_option, layout_options, user_errors

data_app = typer.Typer(help="Dataset tools: check a dataset in any layout before training.", no_args_is_help=True)


@data_app.command("check")
def check_command(
    dataset: Path = typer.Argument(..., help="Dataset folder (or a manifest.json); docs/data.md lists the layouts"),
    layout: str = typer.Option("auto", help="auto | mvtec | folder | labelme | coco | visa | manifest"),
    normal_label: Optional[str] = typer.Option(None, "--normal-label", help="labelme/coco: the label of 'ok' regions (they do not make an image anomalous)"),
    test_fraction: Optional[float] = typer.Option(None, "--test-fraction", help="folder/labelme/coco: share of normal images held out for testing (default 0.2)"),
    split: Optional[str] = typer.Option(None, "--split", help="labelme/coco: auto (train/ and test/ folders, else hash) | hash"),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="coco: the instances .json file"),
    images: Optional[Path] = typer.Option(None, "--images", help="coco: the image folder (default: DATASET)"),
    split_csv: Optional[Path] = typer.Option(None, "--split-csv", help="visa: the split CSV (default DATASET/split_csv/1cls.csv)"),
    visa_object: Optional[str] = typer.Option(None, "--object", help="visa: the object when the CSV holds several"),
    abnormal_dir: Optional[Path] = typer.Option(None, help="folder: anomalous test images"),
    mask_dir: Optional[Path] = typer.Option(None, help="folder: masks for anomalous images"),
    option: list[str] = layout_option(),
    allow_duplicates: bool = typer.Option(False, "--allow-duplicates", help="Identical images in train and test: a warning, not an error"),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Fully decode every image (finds truncated files)"),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Read DATASET, run every check and print a report; exit 2 when it cannot be trained on."""
    with user_errors():
        from ..data.report import check_dataset, format_report

        opts = layout_options(layout, abnormal_dir=abnormal_dir, mask_dir=mask_dir, normal_label=normal_label,
                              annotations=annotations, images=images, split_csv=split_csv, items=option)
        if test_fraction is not None:
            opts["test_fraction"] = test_fraction
        if split is not None:
            opts["split"] = split
        if visa_object is not None:
            opts["object"] = visa_object
        report, _ = check_dataset(dataset, layout, check_decode=decode, allow_duplicates=allow_duplicates,
                                  progress=progress, **opts)
        if json_out:
            emit_json(report)
        colour = "green" if report["ok"] else "red"
        text = format_report(report)
        first, _, rest = text.partition("\n")
        console.print(first, style=f"bold {colour}", highlight=False, soft_wrap=True, markup=False)
        if rest:
            console.print(rest, highlight=False, soft_wrap=True, markup=False)
        if not report["ok"]:
            raise typer.Exit(EXIT_USER_ERROR)
