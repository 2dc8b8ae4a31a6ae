"""What the layout readers share: file listing, mask matching, path helpers and the split rule.

The split rule of the annotation layouts (LabelMe, COCO) is :func:`assign_splits`: an
image below a folder named ``train`` or ``test`` (anywhere in its path) goes to that split
(``split="auto"``, the default); every other normal image goes to ``test`` when
``hash_fraction(file name, seed) < test_fraction`` (default 0.2), else ``train``, exactly
like :func:`~recontrast_core.data.layouts.folder.read_folder`; anomalous images always go
to ``test``. ``split="hash"`` ignores the folders.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from ...errors import UserError
from ..images import IMAGE_EXTENSIONS
from ..manifest import ManifestEntry

PathLike = os.PathLike | str

SPLIT_RULES = ("auto", "hash")


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



def hash_fraction(name: str, seed: int = 0) -> float:
    """A number in [0, 1) from sha1 of ``"<seed>:<name>"``: stable per file name, so adding
    or removing other files never moves this one between splits."""
    digest = hashlib.sha1(f"{seed}:{name}".encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / float(16**15)



def _walk(root: Path) -> list[Path]:
    """Every non-hidden file below ``root`` (hidden folders skipped), sorted by path."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def split_hint(rel: str) -> Optional[str]:
    """``"train"`` / ``"test"`` when a folder of ``rel`` (a path relative to the dataset) is
    named so (case-insensitive; the first such folder counts), else None."""
    for part in Path(rel).parts[:-1]:
        if part.lower() in ("train", "test"):
            return part.lower()
    return None


def _check_split_args(test_fraction: float, split: str) -> None:
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test_fraction must be in [0, 1), not {test_fraction}")
    if split not in SPLIT_RULES:
        raise UserError(f"split must be one of {SPLIT_RULES}, not {split!r}")


def assign_splits(normals: list[tuple[str, str, str]], test_fraction: float = 0.2, seed: int = 0,
                  split: str = "auto") -> dict[str, str]:
    """The split of each normal image: ``normals`` is ``[(row path, file name, path the
    folder hint is read from)]`` (the last: relative to the dataset or the image folder).

    With ``split="auto"`` an image below a ``train/`` or ``test/`` folder (:func:`split_hint`)
    goes there; the others (all of them with ``split="hash"``) go to ``test`` when
    ``hash_fraction(file name, seed) < test_fraction``, else ``train`` (as :func:`read_folder`:
    stable per file name). If no normal image would be left for training, the hashed image
    with the largest hash stays in ``train``."""
    out: dict[str, str] = {}
    hashed: list[tuple[str, str]] = []
    for path, name, hint_path in normals:
        hint = split_hint(hint_path) if split == "auto" else None
        if hint is not None:
            out[path] = hint
        else:
            hashed.append((path, name))
    fracs = {path: hash_fraction(name, seed) for path, name in hashed}
    for path, _ in hashed:
        out[path] = "test" if fracs[path] < test_fraction else "train"
    if hashed and "train" not in out.values():
        keep = max(hashed, key=lambda t: (fracs[t[0]], t[1]))[0]
        out[keep] = "train"
    return out


def _rows(images: list[tuple[str, str, str, Optional[tuple[str, str]]]], test_fraction: float, seed: int,
          split: str) -> list[ManifestEntry]:
    """Rows from ``[(path, file name, hint path, (defect type, mask reference) | None)]``:
    anomalous ones in test, normal ones by :func:`assign_splits`; train first (by path),
    then test by (label, defect type, path)."""
    splits = assign_splits([(p, n, h) for p, n, h, a in images if a is None], test_fraction, seed, split)
    train: list[ManifestEntry] = []
    test: list[ManifestEntry] = []
    for path, _, _, anomaly in images:
        if anomaly is None:
            e = ManifestEntry(path=path, label=0, defect_type="good", split=splits[path])
        else:
            e = ManifestEntry(path=path, label=1, defect_type=anomaly[0], mask_path=anomaly[1], split="test")
        (train if e.split == "train" else test).append(e)
    train.sort(key=lambda e: e.path)
    test.sort(key=lambda e: (e.label, e.defect_type, e.path))
    return train + test


def _size_problem(stated: tuple[Any, Any], actual: tuple[int, int], image: str) -> Optional[str]:
    sw, sh = stated
    if sw is None and sh is None:
        return None
    if (sw, sh) != actual:
        return (f"stated image size {sw}x{sh} (width x height) differs from the image's "
                f"{actual[0]}x{actual[1]} ({image}); the annotation belongs to another image "
                "or the image was resized")
    return None



def _under(root: Path, value: PathLike) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def _rel_or_abs(path: Path, root: Path) -> str:
    """Relative to root when below it, else absolute (a manifest travels with its root)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(Path(os.path.abspath(path)))
