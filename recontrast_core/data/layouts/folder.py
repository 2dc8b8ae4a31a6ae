"""The plain-folder layout: a folder of normal images, optionally a folder of anomalous
images (flat, or one subfolder per defect type) and a mask folder whose files match the
anomalous images by stem. Normal images are split by :func:`~.common.hash_fraction`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ...errors import DataValidationError, UserError
from ..manifest import Manifest, ManifestEntry
from .common import PathLike, _children, _find_mask, _rel, hash_fraction
from .registry import Layout, coerce_options, register_layout


def read_folder(
    normal_dir: PathLike,
    abnormal_dir: Optional[PathLike] = None,
    mask_dir: Optional[PathLike] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Manifest:
    """Read plain folders into a manifest.

    * Normal images (label 0): file ``f`` goes to ``test`` when
      ``hash_fraction(f.name, seed) < test_fraction``, else to ``train``. If that would
      leave no training image, the file with the largest hash stays in ``train``.
    * Anomalous images (label 1), all in ``test``: files directly in ``abnormal_dir`` get
      defect type ``"anomaly"``; files in a subfolder ``abnormal_dir/<type>/`` get
      ``<type>``.
    * Masks, matched by stem in ``mask_dir/<type>/`` first, then ``mask_dir/``:
      ``<stem>_mask.png``, ``<stem>.png``, or either base with any image extension.
      ``has_masks`` is true when ``mask_dir`` is given.

    ``root`` is the folders' deepest common parent and paths are stored relative to it;
    where the folders share no parent but the filesystem root, absolute paths are stored.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test_fraction must be in [0, 1), not {test_fraction}")
    normal = Path(os.path.abspath(normal_dir))
    abnormal = Path(os.path.abspath(abnormal_dir)) if abnormal_dir is not None else None
    masks = Path(os.path.abspath(mask_dir)) if mask_dir is not None else None
    for what, folder in (("normal", normal), ("abnormal", abnormal), ("mask", masks)):
        if folder is not None and not folder.is_dir():
            raise DataValidationError(folder, f"{what} image folder not found")

    given = [f for f in (normal, abnormal, masks) if f is not None]
    common = Path(os.path.commonpath([str(f) for f in given]))
    if common == Path(common.anchor):  # nothing shared but "/" (or a drive)
        root, absolute = normal.parent, True
    else:
        root, absolute = common, False

    def rel(p: Path) -> str:
        return str(p) if absolute else _rel(p, root)

    skip = {f for f in given if f != normal}

    normal_rows = [p for p in _children(normal) if p not in skip]
    fracs = {p: hash_fraction(p.name, seed) for p in normal_rows}
    in_test = {p for p in normal_rows if fracs[p] < test_fraction}
    if normal_rows and len(in_test) == len(normal_rows):
        in_test.discard(max(normal_rows, key=lambda p: (fracs[p], p.name)))

    train_rows: list[ManifestEntry] = []
    test_rows: list[ManifestEntry] = []
    for p in normal_rows:
        e = ManifestEntry(path=rel(p), label=0, defect_type="good",
                          split="test" if p in in_test else "train")
        (test_rows if p in in_test else train_rows).append(e)

    if abnormal is not None:
        loose: list[tuple[str, Path]] = []
        nested: list[tuple[str, Path]] = []
        for child in _children(abnormal):
            if child in skip:
                continue
            if child.is_dir():
                nested.extend((child.name, p) for p in _children(child))
            else:
                loose.append(("anomaly", child))
        for defect, p in sorted(loose + nested, key=lambda t: (t[0], t[1].name)):
            mask = None
            if masks is not None:
                folders = [masks / defect, masks] if defect != "anomaly" else [masks]
                mask = _find_mask(p.stem, folders)
            test_rows.append(
                ManifestEntry(
                    path=rel(p), label=1, defect_type=defect,
                    mask_path=rel(mask) if mask is not None else None, split="test",
                )
            )

    test_rows.sort(key=lambda e: (e.label, e.defect_type, e.path))
    return Manifest(root=str(root), entries=train_rows + test_rows, has_masks=masks is not None)


def _read(path: Optional[PathLike], options: dict) -> Manifest:
    kw = coerce_options("folder", options)
    normal_dir = kw.pop("normal_dir", None) or path
    if normal_dir is None:
        raise UserError("the folder layout needs normal_dir")
    return read_folder(normal_dir, **kw)


register_layout(Layout(
    "folder", "normal_dir=..., optional abnormal_dir=..., mask_dir=...", _read,
    options=("normal_dir", "abnormal_dir", "mask_dir", "test_fraction", "seed"),
    path_options=("normal_dir", "abnormal_dir", "mask_dir"), marker="normal_dir",
))
