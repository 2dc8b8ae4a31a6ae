"""The dataset manifest: one row per image, the artifact every step reads.

File format (``manifest.json``)::

    {"format": "recontrast-manifest/1", "root": "<dataset root>", "has_masks": true,
     "fingerprint": "<sha256 over the rows' sha256>" | null,
     "entries": [{"path": "train/good/a.png", "label": 0, "defect_type": "good",
                  "mask_path": null, "split": "train", "sha256": "..." | null}, ...]}

Paths are stored relative to ``root`` when they lie below it, so a manifest travels with
its dataset. ``label`` is 0 for normal and 1 for anomalous. ``split`` is ``train`` or
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
        p = Path(rel)
        return p if p.is_absolute() else Path(self.root) / p

    def image_paths(self) -> list[Path]:
        return [self.abspath(e.path) for e in self.entries]

    def mask_paths(self) -> list[Optional[Path]]:
        return [self.abspath(e.mask_path) if e.mask_path else None for e in self.entries]

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    # ---- hashing ---------------------------------------------------------------------
    def with_hashes(self) -> "Manifest":
        """Fill sha256 per file (image and mask) and the dataset fingerprint."""
        rows = []
        for e in self.entries:
            h = hashlib.sha256(_file_sha256(self.abspath(e.path)).encode())
            if e.mask_path:
                h.update(_file_sha256(self.abspath(e.mask_path)).encode())
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
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read manifest: {exc}") from exc
        if data.get("format") != MANIFEST_FORMAT:
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


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
