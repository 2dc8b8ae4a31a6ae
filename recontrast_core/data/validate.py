"""Dataset validation, run before any training.

:func:`validate_manifest` checks every row and collects **all** problems, then raises one
:class:`DatasetInvalid` (a :class:`~recontrast_core.errors.DataValidationError`) whose
message names the first problem's file and says ``(and N more problems)``; the full list
is ``exc.problems``. Problems:

* a row that is not an image file: a directory, a missing file, a file whose extension
  is not in :data:`~recontrast_core.data.images.IMAGE_EXTENSIONS`, or a file with an
  image extension that Pillow cannot open;
* an image that cannot be fully decoded (truncated or corrupt; only with
  ``check_decode=True``, the default, as this needs a full decode);
* an anomalous (label 1) row without a mask while the manifest ``has_masks``;
* a mask path that does not exist, is unreadable, or whose size differs from its image;
* a bad label / split value, or a path listed twice in the same split;
* no normal training images (``split == "train"`` and ``label == 0``): names the root.

Warnings (in the returned :class:`ValidationReport`, not errors): no test images, a test
split holding only one class (AUROC needs both), anomalous rows in the train split (the
trainer only uses normal images).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import DataValidationError
from .images import IMAGE_EXTENSIONS, open_image
from .manifest import SPLITS, Manifest, ManifestEntry

ProgressArg = Union[None, bool, Callable[[int, int], None]]


class DatasetInvalid(DataValidationError):
    """One or more dataset files fail validation; ``problems`` lists them all."""

    def __init__(self, problems: list[tuple[str, str]]):
        if not problems:
            raise ValueError("DatasetInvalid needs at least one problem")
        self.problems: list[tuple[str, str]] = list(problems)
        path, problem = self.problems[0]
        more = len(self.problems) - 1
        if more:
            problem = f"{problem} (and {more} more problem{'s' if more > 1 else ''})"
        super().__init__(path, problem)

    def details(self) -> str:
        """All problems, one ``path: problem`` per line."""
        return "\n".join(f"{p}: {msg}" for p, msg in self.problems)


@dataclass
class ValidationReport:
    root: str
    n_entries: int
    #: ``{"train": {"0": n, "1": n}, "test": {...}}`` (string keys: JSON friendly)
    counts: dict[str, dict[str, int]]
    #: test rows per defect type (``good`` included)
    defect_counts: dict[str, int]
    n_masks: int
    has_masks: bool
    decoded: bool
    #: smallest / largest image (width, height) seen
    min_size: Optional[tuple[int, int]] = None
    max_size: Optional[tuple[int, int]] = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = []
        for split in SPLITS:
            c = self.counts.get(split, {})
            parts.append(f"{split}: {c.get('0', 0)} normal / {c.get('1', 0)} anomalous")
        text = f"{self.n_entries} images ({'; '.join(parts)}), {self.n_masks} masks"
        if self.warnings:
            text += "; warnings: " + " | ".join(self.warnings)
        return text


@dataclass
class _RowResult:
    problems: list[tuple[str, str]]
    size: Optional[tuple[int, int]]


def _check_image_file(path: Path, decode: bool, what: str = "image") -> tuple[
    Optional[tuple[int, int]], Optional[str]
]:
    """(size, None) when fine, else (None, problem)."""
    if not path.exists():
        return None, f"{what} file not found"
    if path.is_dir():
        return None, f"is a directory, expected an {what} file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None, (
            f"not an {what} file (extension {path.suffix or '(none)'!r}; accepted: "
            f"{', '.join(IMAGE_EXTENSIONS)}); remove it from the dataset folder"
        )
    try:
        img = open_image(path, decode=decode)
    except DataValidationError as exc:
        return None, exc.problem
    with img:
        return img.size, None


def _check_row(manifest: Manifest, e: ManifestEntry, decode: bool) -> _RowResult:
    problems: list[tuple[str, str]] = []
    img_path = manifest.abspath(e.path)
    if e.label not in (0, 1):
        problems.append((str(img_path), f"label must be 0 (normal) or 1 (anomalous), not {e.label!r}"))
    if e.split not in SPLITS:
        problems.append((str(img_path), f"split must be one of {SPLITS}, not {e.split!r}"))
    size, problem = _check_image_file(img_path, decode)
    if problem:
        problems.append((str(img_path), problem))

    if e.mask_path:
        mask_path = manifest.abspath(e.mask_path)
        msize, mproblem = _check_image_file(mask_path, decode, what="mask")
        if mproblem:
            problems.append((str(mask_path), f"{mproblem} (mask of {img_path})"))
        elif size is not None and msize != size:
            problems.append((
                str(mask_path),
                f"mask size {msize[0]}x{msize[1]} differs from image size "
                f"{size[0]}x{size[1]} ({img_path})",
            ))
    elif e.label == 1 and manifest.has_masks:
        problems.append((
            str(img_path),
            f"anomalous image has no mask (defect type {e.defect_type!r}); the dataset has "
            "masks, so every anomalous image needs one (e.g. "
            f"ground_truth/{e.defect_type}/{Path(e.path).stem}_mask.png)",
        ))
    return _RowResult(problems, size)


def _progress_callback(progress: ProgressArg, total: int):
    """Return (callback(done), close()) for the progress argument."""
    if progress is None or progress is False:
        return (lambda done: None), (lambda: None)
    if callable(progress):
        return (lambda done: progress(done, total)), (lambda: None)
    from ..progress import open_bar

    bar, close = open_bar("validate", total)
    return (lambda done: bar.advance(1)), close


def validate_manifest(
    manifest: Manifest,
    *,
    check_decode: bool = True,
    progress: ProgressArg = None,
    workers: int = 2,
) -> ValidationReport:
    """Validate every row of ``manifest``; raise :class:`DatasetInvalid` listing all problems.

    ``check_decode`` fully decodes every image and mask (detects truncation); without it
    only headers are read (size checks still work). ``progress``: ``True`` for a rich
    progress bar, or a callable ``f(done, total)``.
    """
    entries = manifest.entries
    problems: list[tuple[str, str]] = []

    # Duplicates: the same file twice in one split would double-count it.
    seen: Counter = Counter((e.split, e.path) for e in entries)
    for (split, path), n in sorted(seen.items()):
        if n > 1:
            problems.append((str(manifest.abspath(path)), f"listed {n} times in split {split!r}"))

    tick, close = _progress_callback(progress, len(entries))
    results: list[_RowResult] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, res in enumerate(pool.map(lambda e: _check_row(manifest, e, check_decode), entries)):
                results.append(res)
                tick(i + 1)
    finally:
        close()
    sizes = []
    for res in results:
        problems.extend(res.problems)
        if res.size is not None:
            sizes.append(res.size)

    n_train_normal = sum(1 for e in entries if e.split == "train" and e.label == 0)
    if n_train_normal == 0:
        problems.append((
            str(manifest.root),
            "empty training set: no normal (label 0) images in split 'train' "
            "(expected e.g. train/good/*.png)",
        ))

    if problems:
        raise DatasetInvalid(problems)

    counts: dict[str, dict[str, int]] = {s: {"0": 0, "1": 0} for s in SPLITS}
    defect_counts: Counter = Counter()
    for e in entries:
        counts[e.split][str(e.label)] += 1
        if e.split == "test":
            defect_counts[e.defect_type] += 1

    warnings: list[str] = []
    t0, t1 = counts["test"]["0"], counts["test"]["1"]
    if t0 + t1 == 0:
        warnings.append("no test images: evaluation metrics cannot be computed")
    elif t0 == 0 or t1 == 0:
        only = "normal" if t1 == 0 else "anomalous"
        warnings.append(
            f"test split has only {only} images ({t0 + t1}); image/pixel AUROC need both classes"
        )
    if counts["train"]["1"]:
        warnings.append(
            f"{counts['train']['1']} anomalous images in the train split are not used for training"
        )

    return ValidationReport(
        root=str(manifest.root),
        n_entries=len(entries),
        counts=counts,
        defect_counts=dict(sorted(defect_counts.items())),
        n_masks=sum(1 for e in entries if e.mask_path),
        has_masks=manifest.has_masks,
        decoded=check_decode,
        min_size=min(sizes, key=lambda s: (s[0] * s[1], s)) if sizes else None,
        max_size=max(sizes, key=lambda s: (s[0] * s[1], s)) if sizes else None,
        warnings=warnings,
    )
