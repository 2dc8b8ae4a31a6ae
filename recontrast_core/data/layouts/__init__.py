"""Dataset layouts on disk, read into a :class:`~recontrast_core.data.manifest.Manifest`.

One module per layout, each registering itself (:mod:`.registry`); :func:`read_dataset`
picks the reader by name or auto-detects it. Accepted layouts (docs/data.md describes
every layout and its options):

* **MVTec AD** (:mod:`.mvtec`, :func:`read_mvtec`): ``root/train/good/*``,
  ``root/test/<defect>/*``, optional ``root/ground_truth/<defect>/<stem>_mask.png``.
* **plain folders** (:mod:`.folder`, :func:`read_folder`): a folder of normal images,
  optionally a folder of anomalous images (flat, or one subfolder per defect type) and a
  mask folder whose files match the anomalous images by stem.
* **LabelMe** (:mod:`.labelme`, :func:`read_labelme`): images and LabelMe ``.json`` files.
* **COCO** (:mod:`.coco`, :func:`read_coco`): an instances JSON and an image folder.
* **VisA** (:mod:`.visa`, :func:`read_visa`): the VisA split CSV.
* a saved ``manifest.json`` (:mod:`.saved_manifest`; :func:`read_dataset` only).

The split rule of the annotation layouts and the shared helpers: :mod:`.common`.

The readers do not judge files: every entry found in an image folder becomes a manifest
row, including a stray ``notes.txt``, ``Thumbs.db`` or a subfolder, so that
:func:`~recontrast_core.data.validate.validate_manifest` reports it by name instead of it
being silently ignored. Only hidden entries (names starting with ``.``, e.g.
``.DS_Store``, ``.ipynb_checkpoints``) are skipped. Structural mistakes that leave no
sensible row to write (a file directly in ``test/``, a missing ``train/good/``) raise
:class:`~recontrast_core.errors.DataValidationError` at once.

Order is deterministic: rows are sorted by split (train first), defect type, file name.
"""

from __future__ import annotations

from .common import SPLIT_RULES, PathLike, assign_splits, hash_fraction, split_hint
from .registry import (
    LAYOUT_OPTIONS,
    LAYOUTS,
    PATH_OPTIONS,
    Layout,
    accepted_layouts_help,
    coerce_options,
    detect_layout,
    folder_reader,
    get_layout,
    read_dataset,
    register_layout,
    resolve_layout,
)

# The built-in layouts register themselves on import; this order is the order they are listed in.
from .mvtec import read_mvtec  # noqa: E402,I001
from .folder import read_folder  # noqa: E402
from .labelme import read_labelme  # noqa: E402
from .coco import read_coco  # noqa: E402
from .visa import VISA_COLUMNS, read_visa  # noqa: E402
from . import saved_manifest  # noqa: E402,F401

#: The "accepted layouts: ..." text of the built-in layouts (:func:`accepted_layouts_help`
#: lists every registered one).
ACCEPTED_LAYOUTS_HELP = accepted_layouts_help()

__all__ = [
    "ACCEPTED_LAYOUTS_HELP", "LAYOUT_OPTIONS", "LAYOUTS", "PATH_OPTIONS", "SPLIT_RULES", "VISA_COLUMNS",
    "Layout", "PathLike", "accepted_layouts_help", "assign_splits", "coerce_options", "detect_layout",
    "folder_reader", "get_layout", "hash_fraction", "read_coco", "read_dataset", "read_folder",
    "read_labelme", "read_mvtec", "read_visa", "register_layout", "resolve_layout", "split_hint",
]
