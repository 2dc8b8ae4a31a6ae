"""The dataset manifest: one row per image, the artifact every step reads.

File format (``manifest.json``)::

    {"format": "recontrast-manifest/1", "root": "<dataset root>", "has_masks": true,
     "fingerprint": "<sha256 over the rows' sha256>" | null,
     "entries": [{"path": "train/good/a.png", "label": 0, "defect_type": "good",
                  "mask_path": null, "split": "train", "sha256": "..." | null}, ...]}

Paths are stored relative to ``root`` when they lie below it, so a manifest travels with
its dataset. ``mask_path`` (and, for LabelMe files that embed their image, ``path``) may
instead be an **annotation reference**::

    annotation:<annotation file, relative to root>#<selector>

    annotation:annotations/003.json#labelme:0,2:373x248     shapes 0 and 2 of a LabelMe file,
                                                            rasterised at 373 x 248 (W x H)
    annotation:instances.json#coco:17,18:373x248            COCO annotations 17 and 18
    annotation:annotations/003.json#labelme:imageData       the image embedded in the file

:mod:`recontrast_core.data.annotations` resolves a reference (rasterises the shapes, or
decodes the embedded image) whenever pixels are needed: validation, the image cache,
the report. :meth:`Manifest.source` gives an :class:`AnnotationRef` for such a row and a
:class:`~pathlib.Path` otherwise; :meth:`Manifest.abspath` gives the annotation file, so
messages and :meth:`Manifest.with_hashes` name and hash the file the pixels come from. ``label`` is 0 for normal and 1 for anomalous. ``split`` is ``train`` or
``test``; the validation split used for calibration is carved out of ``train`` at run
time (see :func:`split_validation`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional

from ..errors import UserError

MANIFEST_FORMAT = "recontrast-manifest/1"
SPLITS = ("train", "test")
#: Prefix of an annotation reference in ``path`` / ``mask_path`` (see the module doc).
REFERENCE_PREFIX = "annotation:"


@dataclass(frozen=True)
class AnnotationRef:
    """Pixels that come from an annotation file: ``file`` (absolute) and the ``selector``
    after ``#`` (``labelme:<shape indices>:<W>x<H>``, ``coco:<annotation ids>:<W>x<H>``
    or ``labelme:imageData``)."""

    file: Path
    selector: str

    def __str__(self) -> str:
        return f"{self.file}#{self.selector}"


def is_reference(rel: Optional[str]) -> bool:
    """True when a manifest path is an annotation reference (``annotation:...#...``)."""
    return bool(rel) and str(rel).startswith(REFERENCE_PREFIX)


def make_reference(file_rel: str, selector: str) -> str:
    """``annotation:<file_rel>#<selector>``."""
    return f"{REFERENCE_PREFIX}{file_rel}#{selector}"


def split_reference(rel: str) -> tuple[str, str]:
    """``(annotation file path as stored, selector)`` of a reference."""
    body = rel[len(REFERENCE_PREFIX):]
    file_rel, sep, selector = body.rpartition("#")
    if not sep or not file_rel or not selector:
        raise UserError(f"malformed annotation reference {rel!r} (expected annotation:<file>#<selector>)")
    return file_rel, selector


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    label: int  # 0 normal, 1 anomalous
    defect_type: str = "good"
    mask_path: Optional[str] = None
    split: str = "train"
    sha256: Optional[str] = None


@dataclass
class Manifest:
    root: str
    entries: list[ManifestEntry] = field(default_factory=list)
    has_masks: bool = False
    fingerprint: Optional[str] = None

    # ---- selection -------------------------------------------------------------------
    def select(self, split: Optional[str] = None, label: Optional[int] = None) -> "Manifest":
        rows = [
            e
            for e in self.entries
            if (split is None or e.split == split) and (label is None or e.label == label)
        ]
        return replace(self, entries=rows)

    def subset(self, rows: Iterable[ManifestEntry]) -> "Manifest":
        return replace(self, entries=list(rows))

    def __len__(self) -> int:
        return len(self.entries)

    def abspath(self, rel: str) -> Path:
        """The file behind a manifest path (for a reference: its annotation file)."""
        if is_reference(rel):
            rel = split_reference(rel)[0]
        p = Path(rel)
        return p if p.is_absolute() else Path(self.root) / p

    def source(self, rel: str) -> "Path | AnnotationRef":
        """Where a row's pixels come from: a file path, or an :class:`AnnotationRef`."""
        if is_reference(rel):
            return AnnotationRef(self.abspath(rel), split_reference(rel)[1])
        return self.abspath(rel)

    def image_paths(self) -> list[Path]:
        return [self.abspath(e.path) for e in self.entries]

    def mask_paths(self) -> list[Optional[Path]]:
        return [self.abspath(e.mask_path) if e.mask_path else None for e in self.entries]

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    # ---- hashing ---------------------------------------------------------------------
    def with_hashes(self) -> "Manifest":
        """Fill sha256 per file (image and mask) and the dataset fingerprint. A reference
        hashes its annotation file (the selector is part of the fingerprinted row)."""
        rows = []
        memo: dict[Path, str] = {}  # one COCO file behind many rows is hashed once

        def sha(rel: str) -> str:
            p = self.abspath(rel)
            if p not in memo:
                memo[p] = file_sha256(p)
            return memo[p]

        for e in self.entries:
            h = hashlib.sha256(sha(e.path).encode())
            if e.mask_path:
                h.update(sha(e.mask_path).encode())
            rows.append(replace(e, sha256=h.hexdigest()))
        m = replace(self, entries=rows)
        m.fingerprint = m.compute_fingerprint()
        return m

    def compute_fingerprint(self) -> str:
        """Content fingerprint: independent of the root folder and of row order."""
        h = hashlib.sha256()
        for e in sorted(self.entries, key=lambda r: (r.split, r.path)):
            h.update(
                json.dumps(
                    [e.split, e.path, e.label, e.defect_type, e.mask_path, e.sha256]
                ).encode()
            )
        return h.hexdigest()

    # ---- io --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "root": self.root,
            "has_masks": self.has_masks,
            "fingerprint": self.fingerprint,
            "entries": [asdict(e) for e in self.entries],
        }

    def save(self, path: os.PathLike) -> Path:
        from ..runtime import atomic_write

        text = json.dumps(self.to_dict(), indent=1)
        return atomic_write(Path(path), lambda p: p.write_text(text))

    @classmethod
    def load(cls, path: os.PathLike) -> "Manifest":
        path = Path(path)
        from ..runtime import load_json

        data = load_json(path, lambda p, problem: UserError(f"{p}: cannot read manifest: {problem}"))
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            if not isinstance(data, dict):
                raise UserError(f"{path}: not a recontrast manifest (a JSON {type(data).__name__}, not an object)")
            raise UserError(f"{path}: not a recontrast manifest (format={data.get('format')!r})")
        try:
            entries = [ManifestEntry(**row) for row in data["entries"]]
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: malformed manifest entries: {exc}") from exc
        return cls(
            root=data["root"],
            entries=entries,
            has_masks=bool(data.get("has_masks")),
            fingerprint=data.get("fingerprint"),
        )


def split_validation(
    train: Manifest, fraction: float, seed: int = 0
) -> tuple[Manifest, Manifest]:
    """Hold out a deterministic fraction of the training images for calibration.

    Returns ``(fit, validation)``. With fraction 0 or fewer than 4 images, the
    validation set is empty and calibration falls back to the training scores.
    """
    rows = sorted(train.entries, key=lambda e: e.path)
    n_val = int(round(len(rows) * fraction))
    if fraction <= 0 or len(rows) < 4 or n_val == 0:
        return train, train.subset([])
    rng = random.Random(seed)
    rng.shuffle(rows)
    return train.subset(rows[n_val:]), train.subset(rows[:n_val])


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()

