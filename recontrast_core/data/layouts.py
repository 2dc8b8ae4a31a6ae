"""Dataset layouts on disk, read into a :class:`~recontrast_core.data.manifest.Manifest`.

Accepted layouts:

* **MVTec AD** (:func:`read_mvtec`)::

      root/train/good/*                       normal training images
      root/test/good/*                        normal test images
      root/test/<defect>/*                    anomalous test images
      root/ground_truth/<defect>/<stem>_mask.png   masks (optional folder; ``<stem>.png``
                                              or any image extension is accepted too)

* **plain folders** (:func:`read_folder`): a folder of normal images, optionally a folder
  of anomalous images (flat, or one subfolder per defect type) and a mask folder whose
  files match the anomalous images by stem.

* a saved ``manifest.json`` (:func:`read_dataset` only).

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

import hashlib
import os
from pathlib import Path
from typing import Optional

from ..errors import DataValidationError, UserError
from .images import IMAGE_EXTENSIONS
from .manifest import Manifest, ManifestEntry

PathLike = os.PathLike | str

ACCEPTED_LAYOUTS_HELP = (
    "accepted layouts: 'mvtec' (root/train/good/*, root/test/<defect>/*, optional "
    "root/ground_truth/<defect>/<stem>_mask.png), 'folder' (normal_dir=..., optional "
    "abnormal_dir=..., mask_dir=...), or a manifest.json file"
)


def _children(folder: Path) -> list[Path]:
    """Non-hidden entries of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _find_mask(stem: str, folders: list[Path]) -> Optional[Path]:
    """First existing mask for ``stem`` in ``folders``: ``<stem>_mask.png``, ``<stem>.png``,
    then ``<stem>_mask`` / ``<stem>`` with any other image extension (case-insensitive)."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for name in (f"{stem}_mask.png", f"{stem}.png"):
            if (folder / name).is_file():
                return folder / name
        by_name = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
        for base in (f"{stem}_mask", stem):
            for ext in IMAGE_EXTENSIONS:
                hit = by_name.get(f"{base}{ext}".lower())
                if hit is not None:
                    return hit
    return None


# --------------------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------------------
def read_mvtec(root: PathLike) -> Manifest:
    """Read an MVTec-AD-layout folder (one category) into a manifest; paths relative to root."""
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "dataset folder not found")
    train_good = root / "train" / "good"
    if not train_good.is_dir():
        raise DataValidationError(
            root, "no train/good/ folder, so not an MVTec-layout dataset; " + ACCEPTED_LAYOUTS_HELP
        )
    for extra in _children(root / "train"):
        if extra.name != "good":
            raise DataValidationError(
                extra, "unexpected entry in train/: the MVTec layout trains on train/good/ only"
            )

    gt_root = root / "ground_truth"
    has_masks = gt_root.is_dir()
    entries: list[ManifestEntry] = []
    for p in _children(train_good):
        entries.append(ManifestEntry(path=_rel(p, root), label=0, defect_type="good", split="train"))

    test_root = root / "test"
    if test_root.is_dir():
        for defect_dir in _children(test_root):
            if not defect_dir.is_dir():
                raise DataValidationError(
                    defect_dir,
                    "unexpected file in test/: expected one subfolder per defect type "
                    "(test/good/, test/<defect>/)",
                )
            defect = defect_dir.name
            label = 0 if defect == "good" else 1
            for p in _children(defect_dir):
                mask = None
                if label == 1 and has_masks:
                    mask = _find_mask(p.stem, [gt_root / defect])
                entries.append(
                    ManifestEntry(
                        path=_rel(p, root),
                        label=label,
                        defect_type=defect,
                        mask_path=_rel(mask, root) if mask is not None else None,
                        split="test",
                    )
                )
    return Manifest(root=str(root), entries=entries, has_masks=has_masks)


# --------------------------------------------------------------------------------------
# Plain folders
# --------------------------------------------------------------------------------------
def hash_fraction(name: str, seed: int = 0) -> float:
    """A number in [0, 1) from sha1 of ``"<seed>:<name>"``: stable per file name, so adding
    or removing other files never moves this one between splits."""
    digest = hashlib.sha1(f"{seed}:{name}".encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / float(16**15)


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


# --------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------
def detect_layout(path: PathLike) -> Optional[str]:
    """``"mvtec"``, ``"manifest"`` or ``None`` when the layout cannot be recognised."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        return "manifest"
    if (p / "train" / "good").is_dir():
        return "mvtec"
    return None


def read_dataset(path: Optional[PathLike], layout: str = "auto", **kw) -> Manifest:
    """Read a dataset in any accepted layout.

    ``layout``: ``"auto"`` (MVTec when ``path/train/good/`` exists, a manifest when
    ``path`` is a ``.json`` file, the folder layout when ``normal_dir`` is passed),
    ``"mvtec"``, ``"folder"`` (``path`` is the normal folder unless ``normal_dir`` is
    given; other keywords go to :func:`read_folder`) or ``"manifest"``.
    """
    if layout == "auto":
        if "normal_dir" in kw:
            layout = "folder"
        else:
            if path is None or not Path(path).exists():
                raise DataValidationError(path, "dataset path not found")
            found = detect_layout(path)
            if found is None:
                raise DataValidationError(
                    path, "cannot recognise the dataset layout; " + ACCEPTED_LAYOUTS_HELP
                )
            layout = found
    if layout == "mvtec":
        if kw:
            raise UserError(f"the mvtec layout takes no options, got {sorted(kw)}")
        return read_mvtec(path)
    if layout == "folder":
        normal_dir = kw.pop("normal_dir", None) or path
        if normal_dir is None:
            raise UserError("the folder layout needs normal_dir")
        return read_folder(normal_dir, **kw)
    if layout == "manifest":
        return Manifest.load(path)
    raise UserError(f"unknown dataset layout {layout!r}; " + ACCEPTED_LAYOUTS_HELP)
