"""The VisA layout: the VisA split CSV (``object,split,label,image,mask``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from ...errors import DataValidationError, UserError
from ..manifest import Manifest, ManifestEntry
from ..validate import DatasetInvalid
from .common import PathLike, _rel_or_abs, _under
from .registry import Layout, folder_reader, register_layout

VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def read_visa(root: PathLike, split_csv: Optional[PathLike] = None, object: Optional[str] = None) -> Manifest:  # noqa: A002
    """Read a VisA-style split CSV (columns ``object,split,label,image,mask``).

    ``split_csv`` defaults to ``root/split_csv/1cls.csv`` (VisA's own); relative paths are
    relative to ``root``. ``split`` is ``train`` / ``test``; ``label`` is ``normal`` or
    ``anomaly`` (defect type ``anomaly``); ``image`` and ``mask`` are relative to the
    CSV's folder or to ``root`` (the first that exists). The CSV may hold several objects:
    ``object`` selects one, and is required when there are several. Problems (missing
    columns, a bad split or label, a missing file, an anomalous row without a mask) are
    collected and raised naming the CSV and the row.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "dataset folder not found")
    csv_path = _under(root, split_csv) if split_csv else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataValidationError(csv_path, "VisA split CSV not found (set split_csv=<file>)")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            raw = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataValidationError(csv_path, f"cannot read the split CSV ({exc})") from exc
    missing = [c for c in VISA_COLUMNS if c not in header]
    if missing:
        raise DataValidationError(csv_path, f"missing column(s) {missing}; a VisA split CSV has {','.join(VISA_COLUMNS)}")
    objects = sorted({r["object"] for r in raw})
    if object is None and len(objects) > 1:
        raise UserError(f"{csv_path}: the CSV holds several objects ({', '.join(objects)}); choose one with object=<name>")
    if object is not None and object not in objects:
        raise UserError(f"{csv_path}: no rows for object {object!r} (objects: {', '.join(objects)})")
    problems: list[tuple[str, str]] = []
    entries: list[ManifestEntry] = []

    def locate(value: str) -> Optional[Path]:
        for base in (csv_path.parent, root):
            if (base / value).exists():
                return base / value
        return None

    for line, r in enumerate(raw, start=2):
        if object is not None and r["object"] != object:
            continue
        where = f"row {line}"
        split, label = r["split"].lower(), r["label"].lower()
        if split not in ("train", "test"):
            problems.append((str(csv_path), f"{where}: split must be train or test, not {r['split']!r}"))
            continue
        if label not in ("normal", "anomaly"):
            problems.append((str(csv_path), f"{where}: label must be normal or anomaly, not {r['label']!r}"))
            continue
        image = locate(r["image"]) if r["image"] else None
        if image is None:
            problems.append((str(csv_path), f"{where}: image {r['image']!r} not found next to the CSV or below {root}"))
            continue
        mask = None
        if label == "anomaly":
            mask = locate(r["mask"]) if r["mask"] else None
            if mask is None:
                problems.append((str(csv_path), f"{where}: anomalous image {r['image']!r} has no mask "
                                                f"({r['mask']!r} not found)"))
                continue
        entries.append(ManifestEntry(
            path=_rel_or_abs(image, root), label=int(label == "anomaly"),
            defect_type="anomaly" if label == "anomaly" else "good",
            mask_path=_rel_or_abs(mask, root) if mask is not None else None, split=split,
        ))
    if not entries and not problems:
        problems.append((str(csv_path), "no rows"))
    if problems:
        raise DatasetInvalid(problems)
    entries.sort(key=lambda e: (e.split != "train", e.label, e.defect_type, e.path))
    return Manifest(root=str(root), entries=entries, has_masks=True)


register_layout(Layout(
    "visa", "split_csv=<csv>", folder_reader("visa", read_visa),
    options=("split_csv", "object"), path_options=("split_csv",),
    detect=lambda p: (p / "split_csv" / "1cls.csv").is_file(), priority=20,
))
