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
* no normal training images (``split == "train"`` and ``label == 0``): names the root;
* an annotation reference (LabelMe / COCO mask, LabelMe embedded image) that cannot be
  rasterised or decoded, or whose mask size differs from the image;
* **leakage**: the same image content (sha256 of the image bytes) in the train and the test
  split, whatever the file names; ``allow_duplicates=True`` turns it into a warning.

The annotation readers (:mod:`recontrast_core.data.layouts`) check the annotation files
themselves before a manifest exists (invalid JSON, unknown shape types, polygons with fewer
than three points, ``imagePath`` outside the dataset, missing images, stated sizes that
differ from the image, COCO references to unknown images or categories) and raise the same
:class:`DatasetInvalid`.

Warnings (in the returned :class:`ValidationReport`, not errors): no test images, a test
split holding only one class (AUROC needs both), anomalous rows in the train split (the
trainer only uses normal images), annotation points outside their image (clipped),
allowed train/test duplicates.
"""

from __future__ import annotations

import os

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import DataValidationError
from .annotations import reference_mask, source_info, source_sha256
from .images import IMAGE_EXTENSIONS, open_image
from .manifest import SPLITS, AnnotationRef, Manifest, ManifestEntry

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
    #: images per size ``"WxH"`` and per Pillow mode
    sizes: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    #: groups of rows with the same image content: ``{"sha256", "paths", "splits"}``
    duplicates: list[dict] = field(default_factory=list)

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
    mode: Optional[str] = None
    sha: Optional[str] = None
    warnings: list[str] = field(default_factory=list)


def _check_image_file(path: Path, decode: bool, what: str = "image") -> tuple[
    Optional[tuple[int, int]], Optional[str]
]:
    """(size, None) when fine, else (None, problem)."""
    size, _, problem = _image_info(path, decode, what)
    return size, problem


def _image_info(path: "Path | AnnotationRef", decode: bool, what: str = "image") -> tuple[
    Optional[tuple[int, int]], Optional[str], Optional[str]
]:
    """(size, mode, None) when fine, else (None, None, problem)."""
    if isinstance(path, AnnotationRef):
        try:
            size, mode = source_info(path, decode)
        except DataValidationError as exc:
            return None, None, exc.problem
        return size, mode, None
    if not path.exists():
        return None, None, f"{what} file not found"
    if path.is_dir():
        return None, None, f"is a directory, expected an {what} file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None, None, (
            f"not an {what} file (extension {path.suffix or '(none)'!r}; accepted: "
            f"{', '.join(IMAGE_EXTENSIONS)}); remove it from the dataset folder"
        )
    try:
        img = open_image(path, decode=decode)
    except DataValidationError as exc:
        return None, None, exc.problem
    with img:
        return img.size, img.mode, None


def _check_mask(src: "Path | AnnotationRef", decode: bool) -> tuple[Optional[tuple[int, int]], Optional[str], int]:
    """(size, problem, annotation points outside the image) of a mask file or reference."""
    if isinstance(src, AnnotationRef):
        try:
            mask, outside = reference_mask(src)
        except DataValidationError as exc:
            return None, exc.problem, 0
        return (mask.shape[1], mask.shape[0]), None, outside
    size, problem = _check_image_file(src, decode, what="mask")
    return size, problem, 0


def _escapes_root(path: Path, root: Path) -> Optional[Path]:
    """Where ``path`` really is, when it lies under ``root`` by name but a symlink (of the file
    or of a folder on the way) takes it outside; else None. Paths outside ``root`` by name
    (a layout option pointing elsewhere) are not this check's business."""
    try:
        path.relative_to(root)
    except ValueError:
        return None
    real = path.resolve()
    try:
        real.relative_to(root.resolve())
        return None
    except ValueError:
        return real


def _check_row(manifest: Manifest, e: ManifestEntry, decode: bool) -> _RowResult:
    problems: list[tuple[str, str]] = []
    warnings: list[str] = []
    src = manifest.source(e.path)
    img_path = src if isinstance(src, AnnotationRef) else manifest.abspath(e.path)
    root = Path(os.path.abspath(manifest.root))
    for what, rel in (("image", e.path), ("mask", e.mask_path)):
        if not rel or isinstance(manifest.source(rel), AnnotationRef):
            continue
        real = _escapes_root(Path(os.path.abspath(manifest.abspath(rel))), root)
        if real is not None:
            problems.append((str(manifest.abspath(rel)), f"{what} is a symlink that leaves the dataset root "
                                                         f"{root} (-> {real}); copy the file into the dataset"))
            return _RowResult(problems, None, None, None, warnings)
    if e.label not in (0, 1):
        problems.append((str(img_path), f"label must be 0 (normal) or 1 (anomalous), not {e.label!r}"))
    if e.split not in SPLITS:
        problems.append((str(img_path), f"split must be one of {SPLITS}, not {e.split!r}"))
    size, mode, problem = _image_info(src, decode)
    sha = None
    if problem:
        problems.append((str(img_path), problem))
    else:
        try:
            sha = source_sha256(src)
        except (OSError, DataValidationError):
            sha = None

    if e.mask_path:
        msrc = manifest.source(e.mask_path)
        mask_path = msrc.file if isinstance(msrc, AnnotationRef) else msrc
        msize, mproblem, outside = _check_mask(msrc, decode)
        if outside:
            warnings.append(f"{mask_path}: {outside} annotation point(s) outside the "
                            f"{msize[0]}x{msize[1]} image {img_path}, clipped at the border")
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
    return _RowResult(problems, size, mode, sha, warnings)


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
    allow_duplicates: bool = False,
) -> ValidationReport:
    """Validate every row of ``manifest``; raise :class:`DatasetInvalid` listing all problems.

    ``check_decode`` fully decodes every image and mask (detects truncation); without it
    only headers are read (size checks still work). ``progress``: ``True`` for a rich
    progress bar, or a callable ``f(done, total)``. ``allow_duplicates``: the same image
    content in train and test is a warning instead of an error.
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
    size_counts: Counter = Counter()
    mode_counts: Counter = Counter()
    row_warnings: list[str] = []
    by_sha: dict[str, list[ManifestEntry]] = {}
    for e, res in zip(entries, results):
        problems.extend(res.problems)
        row_warnings.extend(res.warnings)
        if res.size is not None:
            sizes.append(res.size)
            size_counts[f"{res.size[0]}x{res.size[1]}"] += 1
        if res.mode is not None:
            mode_counts[res.mode] += 1
        if res.sha is not None:
            by_sha.setdefault(res.sha, []).append(e)

    duplicates: list[dict] = []
    leak_warnings: list[str] = []
    for sha, rows in sorted(by_sha.items()):
        if len({r.path for r in rows}) < 2:
            continue
        duplicates.append({"sha256": sha, "paths": [r.path for r in rows], "splits": sorted({r.split for r in rows})})
        train = [r for r in rows if r.split == "train"]
        for r in rows:
            if r.split == "test" and train:
                msg = (f"same image content (sha256 {sha[:12]}...) as training image {train[0].path}: "
                       "an image in both the train and the test split leaks into evaluation")
                if allow_duplicates:
                    leak_warnings.append(f"{r.path}: {msg} (allowed)")
                else:
                    problems.append((str(manifest.abspath(r.path)), msg + "; remove one copy, or allow it with "
                                                                          "allow_duplicates (--allow-duplicates)"))

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
    warnings.extend(row_warnings)
    warnings.extend(leak_warnings)

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
        sizes=dict(sorted(size_counts.items())),
        modes=dict(sorted(mode_counts.items())),
        duplicates=duplicates,
    )
