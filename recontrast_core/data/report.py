"""The dataset report (``recontrast data check``; the ingest step's ``dataset_card.json``).

:func:`check_dataset` reads a dataset in any layout, runs every check (the reader's checks
of annotation files, then :func:`~recontrast_core.data.validate.validate_manifest`) and
returns the report whether or not the data passed; :func:`dataset_report` builds it from a
manifest and its validation. Format (``recontrast-dataset-card/1``)::

    {"format", "root", "layout", "source", "fingerprint",
     "ok": bool,              # every check passed: the data can be trained on
     "n_images", "normal", "anomalous",
     "splits": {"train": {"normal", "anomalous", "defect_types": {type: n}}, "test": {...}},
     "masks": {"count", "mean_coverage", "per_defect_type": {type: mean coverage}},
     "image_sizes": {"WxH": n}, "image_modes": {mode: n}, "min_size", "max_size",
     "duplicates": [{"sha256", "paths", "splits"}],
     "warnings": [str], "problems": [{"path", "problem"}], "notes": [str]}

``mean_coverage`` is the mean over masks of the fraction of the image's pixels marked as
defect, at the original image size (``None`` without masks).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

import numpy as np

from ..errors import DataValidationError
from .annotations import load_source_mask
from .manifest import SPLITS, Manifest
from .validate import DatasetInvalid, ProgressArg, ValidationReport, validate_manifest

DATASET_CARD_FILE = "dataset_card.json"
REPORT_FORMAT = "recontrast-dataset-card/1"
NORMAL_ONLY_NOTE = ("no anomalous test image: evaluation reports the false-positive rate at the threshold, the "
                    "score distribution and an AUROC on synthesised anomalies (image AUROC needs real anomalies)")


def _splits(manifest: Manifest) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        rows = [e for e in manifest.entries if e.split == split]
        out[split] = {
            "normal": sum(1 for e in rows if e.label == 0),
            "anomalous": sum(1 for e in rows if e.label == 1),
            "defect_types": dict(sorted(Counter(e.defect_type for e in rows).items())),
        }
    return out


def mask_coverage(manifest: Manifest, workers: int = 2) -> dict[str, Any]:
    """``{"count", "mean_coverage", "per_defect_type"}`` over the rows with a mask."""
    rows = [e for e in manifest.entries if e.mask_path]

    def fraction(e) -> Optional[float]:
        try:
            m = load_source_mask(manifest.source(e.mask_path))
        except DataValidationError:
            return None
        return float(m.mean()) if m.size else 0.0

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        fracs = list(pool.map(fraction, rows))
    per: dict[str, list[float]] = {}
    for e, f in zip(rows, fracs):
        if f is not None:
            per.setdefault(e.defect_type, []).append(f)
    allf = [f for f in fracs if f is not None]
    return {
        "count": len(rows),
        "mean_coverage": float(np.mean(allf)) if allf else None,
        "per_defect_type": {k: float(np.mean(v)) for k, v in sorted(per.items())},
    }


def dataset_report(
    manifest: Manifest,
    validation: Optional[ValidationReport] = None,
    *,
    layout: Optional[str] = None,
    source: Optional[str] = None,
    problems: Optional[list[tuple[str, str]]] = None,
    coverage: bool = True,
) -> dict:
    """The report of ``manifest``; ``validation`` adds sizes, modes, duplicates and warnings
    (absent when validation failed: then ``problems`` lists why and ``ok`` is false)."""
    splits = _splits(manifest)
    anomalous = sum(s["anomalous"] for s in splits.values())
    notes = []
    if validation is not None and anomalous == 0:
        notes.append(NORMAL_ONLY_NOTE)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "root": str(manifest.root),
        "layout": layout,
        "source": source,
        "fingerprint": manifest.fingerprint,
        "ok": validation is not None and not problems,
        "n_images": len(manifest),
        "normal": len(manifest) - anomalous,
        "anomalous": anomalous,
        "splits": splits,
        "masks": mask_coverage(manifest) if coverage and validation is not None else
        {"count": sum(1 for e in manifest.entries if e.mask_path), "mean_coverage": None, "per_defect_type": {}},
        "image_sizes": dict(validation.sizes) if validation else {},
        "image_modes": dict(validation.modes) if validation else {},
        "min_size": list(validation.min_size) if validation and validation.min_size else None,
        "max_size": list(validation.max_size) if validation and validation.max_size else None,
        "duplicates": list(validation.duplicates) if validation else [],
        "warnings": list(validation.warnings) if validation else [],
        "problems": [{"path": p, "problem": m} for p, m in (problems or [])],
        "notes": notes,
    }
    return report


def check_dataset(
    path: Union[str, os.PathLike],
    layout: str = "auto",
    *,
    check_decode: bool = True,
    allow_duplicates: bool = False,
    progress: ProgressArg = None,
    **options: Any,
) -> tuple[dict, Optional[Manifest]]:
    """Read and check a dataset; ``(report, manifest or None)``. Never raises for bad data:
    the problems are in the report (``ok`` false). Bad options (a
    :class:`~recontrast_core.errors.UserError` that is not about a file) still raise."""
    from .layouts import read_dataset, resolve_layout

    try:
        layout = resolve_layout(path, layout, options)  # the report names what was read
        manifest = read_dataset(path, layout=layout, **options)
    except DatasetInvalid as exc:
        return _failed(path, layout, exc.problems), None
    except DataValidationError as exc:
        return _failed(path, layout, [(exc.path, exc.problem)]), None
    try:
        validation = validate_manifest(manifest, check_decode=check_decode, progress=progress,
                                       allow_duplicates=allow_duplicates)
    except DatasetInvalid as exc:
        return dataset_report(manifest, None, layout=layout, problems=exc.problems), manifest
    return dataset_report(manifest, validation, layout=layout), manifest


def _failed(path, layout: str, problems: list[tuple[str, str]]) -> dict:
    return dataset_report(Manifest(root=str(path)), None, layout=layout, problems=problems)


def format_report(report: dict) -> str:
    """The report as text lines (what ``recontrast data check`` prints without ``--json``)."""
    lines = [f"dataset {report['root']} (layout {report.get('layout') or 'auto'}): "
             f"{'OK, can be trained on' if report['ok'] else 'CANNOT be trained on'}"]
    if report["problems"] and not report["n_images"]:  # the reader refused the dataset: nothing to count
        return "\n".join(lines + [f"  problem: {p['path']}: {p['problem']}" for p in report["problems"]])
    lines.append(f"  {report['n_images']} images: {report['normal']} normal, {report['anomalous']} anomalous")
    for split, s in report["splits"].items():
        types = ", ".join(f"{k} {v}" for k, v in s["defect_types"].items()) or "-"
        lines.append(f"  {split}: {s['normal']} normal, {s['anomalous']} anomalous ({types})")
    m = report["masks"]
    if m["count"]:
        cov = f"{m['mean_coverage']:.4%}" if m["mean_coverage"] is not None else "n/a"
        per = ", ".join(f"{k} {v:.4%}" for k, v in m["per_defect_type"].items())
        lines.append(f"  masks: {m['count']}, mean coverage {cov}" + (f" ({per})" if per else ""))
    else:
        lines.append("  masks: none")
    if report["image_sizes"]:
        sizes = sorted(report["image_sizes"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k} x{v}" for k, v in sizes[:5]) + (f", ... ({len(sizes)} sizes)" if len(sizes) > 5 else "")
        lines.append(f"  image sizes: {shown}")
        lines.append("  image modes: " + ", ".join(f"{k} x{v}" for k, v in report["image_modes"].items()))
    if report["duplicates"]:
        lines.append(f"  duplicates: {len(report['duplicates'])} group(s) of identical images")
        for d in report["duplicates"][:5]:
            lines.append(f"    {', '.join(d['paths'])} ({'/'.join(d['splits'])})")
    for w in report["warnings"]:
        lines.append(f"  warning: {w}")
    for n in report.get("notes", []):
        lines.append(f"  note: {n}")
    for p in report["problems"]:
        lines.append(f"  problem: {p['path']}: {p['problem']}")
    return "\n".join(lines)
