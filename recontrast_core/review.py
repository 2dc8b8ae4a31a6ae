"""The human review loop, core side: scored images -> a LabelMe project -> reviewed images
back into the dataset.

**Export** (:func:`select_for_review`, :func:`export_review`): from the rows of a
batch-scoring table, the images the model flagged (``decision`` true) and those in a
borderline band of the normalised score around the threshold (0.5; default band
``[0.4, 0.6)``) are copied into a LabelMe project, one JSON per image beside it, with
polygons pre-filled from the anomaly map: the image is scored again, its map resized to
the image's size and cut at the calibration threshold, and the outer contour of each region
traced (:func:`trace_regions`: Moore-neighbour tracing on the 8-connected regions, simplified
by Douglas-Peucker; holes are not kept, so a region is drawn filled). ``review.json``
lists the items (source, scores, why each was picked).

**The reviewer** opens the folder in LabelMe, corrects the polygons (delete them all for
a normal image, draw new ones for a missed defect, rename the label for the defect type)
and ticks the image flag ``reviewed`` (``skip`` leaves an image out).

**Import** (:func:`read_review`, :func:`import_into_dataset`): every reviewed image with at
least one region is a confirmed anomaly (defect type: the first shape's label), every
reviewed image without regions a confirmed normal. Into an MVTec-layout dataset the
anomalies go to ``test/<label>/`` with their polygons rasterised as
``ground_truth/<label>/<stem>_mask.png``, the normals to ``train/good/``; into a LabelMe
dataset the anomalies go to ``test/review/`` with their JSON and the normals to
``train/review/``. An image whose content is already in the dataset is skipped. Versioning
the result (DVC, the remote) is the MLOps side's (:mod:`recontrast_core.mlops.review_loop`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .data.manifest import file_sha256
from .errors import UserError
from .runtime import atomic_write, atomic_write_json, ensure_output_dir, read_json

REVIEW_FILE = "review.json"
REVIEW_FORMAT = "recontrast-review/1"
IMPORT_FILE = "import.json"
DEFAULT_BAND = (0.4, 0.6)
DEFAULT_LABEL = "anomaly"
LABELME_VERSION = "5.5.0"  # the LabelMe file format written (the keys LabelMe 5 and 6 read)
FLAG_REVIEWED = "reviewed"
FLAG_SKIP = "skip"
REVIEW_SUBFOLDER = "review"  # LabelMe datasets: test/review/, train/review/
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
INSTRUCTIONS = ("Open this folder in LabelMe. For each image: fix the polygons (delete them all if the image is "
                "normal, draw the ones the model missed, set the label to the defect type), tick the flag "
                f"'{FLAG_REVIEWED}' and save; tick '{FLAG_SKIP}' to leave an image out. Then run "
                "`recontrast review import <this folder> --dataset <dataset root>`.")

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------
# which images
# ---------------------------------------------------------------------------------------
def check_band(band: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(band[0]), float(band[1])) if len(band) == 2 else (None, None)
    if lo is None or not (0.0 <= lo <= 0.5 <= hi <= 1.0) or lo >= hi:
        raise UserError(f"--band takes LO,HI around the threshold 0.5 with 0 <= LO <= 0.5 <= HI <= 1, not {band!r}")
    return lo, hi


def select_for_review(rows: Iterable[Mapping[str, Any]], band: Sequence[float] = DEFAULT_BAND,
                      flagged: bool = True, limit: Optional[int] = None) -> list[dict]:
    """The rows to review, each with ``reason``: ``flagged`` (the model said anomalous) or
    ``borderline`` (normalised score in ``[lo, hi)``, not flagged). Unreadable rows are left
    out. Order: the most doubtful first (normalised score closest to 0.5), then the rest of
    the flagged by score. ``limit`` keeps the first ``limit``."""
    lo, hi = check_band(band)
    picked: list[tuple[tuple, dict]] = []  # (sort key, row)
    for row in rows:
        if row.get("error") or row.get("score") is None or row.get("normalized_score") is None:
            continue
        norm = float(row["normalized_score"])
        is_flagged = bool(row.get("decision"))
        if lo <= norm < hi:
            picked.append(((0, abs(norm - 0.5)), {**row, "reason": "flagged" if is_flagged else "borderline"}))
        elif flagged and is_flagged:
            picked.append(((1, -norm), {**row, "reason": "flagged"}))
    picked.sort(key=lambda kr: kr[0])
    return [r for _, r in picked[:limit]]


# ---------------------------------------------------------------------------------------
# polygons from an anomaly map
# ---------------------------------------------------------------------------------------
# The 8 neighbours, clockwise on screen (y down), starting west: (dy, dx)
_RING = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))
_RING_INDEX = {d: i for i, d in enumerate(_RING)}


def trace_outer_boundary(mask: np.ndarray) -> list[tuple[int, int]]:
    """The outer boundary of the one 8-connected region in ``mask`` (bool [H, W]), as
    ``(x, y)`` pixel centres in clockwise order (Moore-neighbour tracing, stopped when the
    first move repeats)."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return []
    start = (int(ys[0]), int(xs[0]))  # row-major: topmost, then leftmost; its west is background
    cur, back = start, 0
    out = [start]
    first: Optional[tuple] = None
    for _ in range(8 * int(m.sum()) + 16):
        for k in range(1, 9):
            d = (back + k) % 8
            nxt = (cur[0] + _RING[d][0], cur[1] + _RING[d][1])
            if m[nxt]:
                break
        else:
            break  # a single pixel
        prev = (back + k - 1) % 8
        b = (cur[0] + _RING[prev][0], cur[1] + _RING[prev][1])
        move = (cur, nxt)
        if first is None:
            first = move
        elif move == first:
            out.pop()  # back at the start, about to repeat the first move
            break
        back = _RING_INDEX[(b[0] - nxt[0], b[1] - nxt[1])]
        out.append(nxt)
        cur = nxt
    return [(x - 1, y - 1) for y, x in out]


def _rdp(points: np.ndarray, eps: float) -> np.ndarray:
    """Douglas-Peucker on an open polyline (kept: both ends)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        a, b = stack.pop()
        if b <= a + 1:
            continue
        seg = points[b] - points[a]
        rel = points[a + 1:b] - points[a]
        norm = float(np.hypot(*seg))
        dist = (np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / norm) if norm > 0 else np.hypot(rel[:, 0], rel[:, 1])
        i = int(np.argmax(dist))
        if dist[i] > eps:
            keep[a + 1 + i] = True
            stack += [(a, a + 1 + i), (a + 1 + i, b)]
    return points[keep]


def simplify_closed(points: Sequence[tuple[float, float]], eps: float = 1.0) -> list[list[float]]:
    """A closed polygon simplified by Douglas-Peucker (split at the vertex farthest from
    the first); at most ``eps`` pixels from the traced boundary."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) <= 3 or eps <= 0:
        return p.tolist()
    far = int(np.argmax(np.hypot(*(p - p[0]).T)))
    if far == 0:
        return p[:1].tolist()
    a = _rdp(p[: far + 1], eps)
    b = _rdp(np.vstack([p[far:], p[:1]]), eps)
    return np.vstack([a[:-1], b[:-1]]).tolist()


def _box(ys: np.ndarray, xs: np.ndarray, w: int, h: int) -> list[list[float]]:
    x0, x1 = max(0.0, xs.min() - 0.5), min(w - 1.0, xs.max() + 0.5)
    y0, y1 = max(0.0, ys.min() - 0.5), min(h - 1.0, ys.max() + 0.5)
    if x1 <= x0:
        x0, x1 = max(0.0, x0 - 0.5), min(w - 1.0, x1 + 0.5)
    if y1 <= y0:
        y0, y1 = max(0.0, y0 - 0.5), min(h - 1.0, y1 + 0.5)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def trace_regions(mask: np.ndarray, *, min_area: int = 4, max_regions: int = 50,
                  eps: float = 1.0) -> list[list[list[float]]]:
    """Polygons (``[[x, y], ...]``, pixel centres, at least 3 points) of the 8-connected
    regions of ``mask`` with at least ``min_area`` pixels, largest first (at most
    ``max_regions``). A region too thin to trace as a polygon gets its bounding box."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    areas = np.bincount(labels.ravel())[1:]
    order = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] >= min_area][:max_regions]
    slices = ndimage.find_objects(labels)
    polygons = []
    for i in order:
        sl = slices[i]
        region = labels[sl] == i + 1
        oy, ox = sl[0].start, sl[1].start
        pts = simplify_closed([(x + ox, y + oy) for x, y in trace_outer_boundary(region)], eps)
        uniq = {tuple(p) for p in pts}
        if len(uniq) < 3 or _area(pts) < 0.5:
            ys, xs = np.nonzero(region)
            pts = _box(ys + oy, xs + ox, w, h)
        polygons.append([[float(x), float(y)] for x, y in pts])
    return polygons


def _area(pts: Sequence[Sequence[float]]) -> float:
    p = np.asarray(pts, dtype=np.float64)
    return 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))))


def map_regions(anomaly_map: np.ndarray, threshold: float, size: tuple[int, int], **kw) -> list[list[list[float]]]:
    """The regions of ``anomaly_map`` (the model's [S, S] map) at or above ``threshold``,
    traced at the image's ``size`` (W, H): the map is resized (bilinear) to the image first."""
    import torch
    import torch.nn.functional as F

    w, h = size
    m = torch.as_tensor(np.asarray(anomaly_map, dtype=np.float32))[None, None]
    full = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    min_area = kw.pop("min_area", max(4, int(0.0002 * w * h)))
    return trace_regions(full >= threshold, min_area=min_area, **kw)


# ---------------------------------------------------------------------------------------
# LabelMe files
# ---------------------------------------------------------------------------------------
def labelme_shape(points: Sequence[Sequence[float]], label: str = DEFAULT_LABEL, description: str = "") -> dict:
    return {"label": label, "points": [[float(x), float(y)] for x, y in points], "group_id": None,
            "description": description, "shape_type": "polygon", "flags": {}, "mask": None}


def labelme_document(image_name: str, size: tuple[int, int], shapes: Sequence[dict],
                     flags: Optional[Mapping[str, bool]] = None, extra: Optional[Mapping[str, Any]] = None) -> dict:
    """A LabelMe annotation (the keys LabelMe writes): the image beside it (``imagePath``,
    no embedded ``imageData``), its size, the shapes and the image flags; ``extra`` keys are
    kept by LabelMe as they are."""
    w, h = size
    doc = {"version": LABELME_VERSION, "flags": dict(flags or {}), "shapes": list(shapes), "imagePath": image_name,
           "imageData": None, "imageHeight": int(h), "imageWidth": int(w)}
    doc.update(extra or {})
    return doc


def review_name(source: str, suffix: str) -> str:
    """``<stem>-<10 hex of the source's SHA-1><suffix>``: unique per source, stable."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source.rsplit("/", 1)[-1]).stem)[:80] or "image"
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:10]}{suffix.lower()}"


def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda p: shutil.copyfile(src, p))


def export_review(detector, items: Sequence[Mapping[str, Any]], out_dir: PathLike, *,
                  local_path: Callable[[Mapping[str, Any]], Path] = lambda r: Path(r["path"]),
                  band: Sequence[float] = DEFAULT_BAND, label: str = DEFAULT_LABEL, source_table: str = "",
                  model: Optional[Mapping[str, Any]] = None, progress: bool = True) -> dict:
    """Write the LabelMe project of ``items`` (rows of :func:`select_for_review`) into
    ``out_dir``: each image copied, its JSON beside it with the polygons of its map at the
    detector's threshold, and ``review.json``. ``local_path(row)`` gives the image file
    (a download of an ``s3://`` row). Returns the ``review.json`` payload."""
    from .bundle import to_model_input
    from .data.images import image_size
    from .progress import track_steps

    label, band = check_label(label), check_band(band)
    out = ensure_output_dir(out_dir, "review folder")
    if (out / REVIEW_FILE).exists():
        raise UserError(f"{out}: already holds a review ({REVIEW_FILE}); choose another --out")
    import torch

    threshold = float(detector.calibration.threshold)
    entries = []
    with track_steps("review: tracing anomaly maps", len(items), enabled=progress) as bar:
        for row in items:
            src = local_path(row)
            name = review_name(str(row["path"]), src.suffix or ".png")
            arr = to_model_input(src, detector.image_size)
            maps, scores = detector.score_uint8(torch.from_numpy(arr[None]))
            size = image_size(src)
            polygons = map_regions(maps[0], threshold, size)
            _copy(src, out / name)
            info = {"source": str(row["path"]), "score": float(scores[0]),
                    "normalized_score": row.get("normalized_score"), "decision": row.get("decision"),
                    "reason": row["reason"], "threshold": threshold}
            doc = labelme_document(name, size, [labelme_shape(p, label) for p in polygons],
                                   flags={FLAG_REVIEWED: False, FLAG_SKIP: False}, extra={"recontrast": info})
            ann = Path(name).with_suffix(".json").name
            atomic_write_json(out / ann, doc)
            entries.append({"image": name, "annotation": ann, "sha256": file_sha256(out / name), "polygons": len(polygons),
                            **{k: v for k, v in info.items() if k != "threshold"}})
            bar.advance(1)
    payload = {"format": REVIEW_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "source_table": source_table, "model": dict(model or {}), "threshold": threshold,
               "band": list(band), "label": label, "instructions": INSTRUCTIONS,
               "counts": {"flagged": sum(e["reason"] == "flagged" for e in entries),
                          "borderline": sum(e["reason"] == "borderline" for e in entries)},
               "items": entries}
    atomic_write_json(out / REVIEW_FILE, payload)
    return payload


def check_label(label: str) -> str:
    label = (label or "").strip() or DEFAULT_LABEL
    if not _LABEL.match(label) or label == "good":
        raise UserError(f"defect label {label!r}: use letters, digits, '_', '-' or '.' (a folder name), not 'good'")
    return label


# ---------------------------------------------------------------------------------------
# reading the reviewed project
# ---------------------------------------------------------------------------------------
@dataclass
class ReviewedImage:
    image: Path
    annotation: Path
    source: str
    verdict: str  # "anomaly" | "normal" | "unreviewed" | "skipped"
    label: Optional[str] = None
    shapes: list = field(default_factory=list)  # annotations.LabelmeShape
    doc: dict = field(default_factory=dict)
    sha256: str = ""


def read_review(project: PathLike) -> tuple[dict, list[ReviewedImage]]:
    """``review.json`` and each item's verdict from its LabelMe file (the reviewer's
    edits). A file LabelMe cannot have written (bad shapes, bad flags) is a
    :class:`UserError` naming it."""
    from .data.annotations import is_labelme, labelme_shapes

    root = Path(project)
    meta = read_json(root / REVIEW_FILE)
    if not isinstance(meta, dict) or meta.get("format") != REVIEW_FORMAT:
        raise UserError(f"{root}: not a review folder (no {REVIEW_FILE} from `recontrast review export`)")
    out = []
    for item in meta.get("items") or []:
        image, ann = root / str(item["image"]), root / str(item["annotation"])
        if not image.is_file():
            raise UserError(f"{image}: image of the review missing")
        doc = read_json(ann) if ann.is_file() else None
        if doc is None:
            out.append(ReviewedImage(image, ann, item.get("source", ""), "unreviewed"))
            continue
        if not is_labelme(doc):
            raise UserError(f"{ann}: not a LabelMe annotation (no 'shapes')")
        flags = doc.get("flags") or {}
        if not isinstance(flags, dict):
            raise UserError(f"{ann}: 'flags' must be an object of true/false values")
        shapes, problems = labelme_shapes(doc, ann)
        if problems:
            raise UserError(f"{ann}: {problems[0]}")
        if flags.get(FLAG_SKIP):
            verdict = "skipped"
        elif not flags.get(FLAG_REVIEWED):
            verdict = "unreviewed"
        else:
            verdict = "anomaly" if shapes else "normal"
        label = check_label(shapes[0].label) if verdict == "anomaly" else None
        sha = file_sha256(image) if verdict in ("anomaly", "normal") else ""  # only these are imported
        out.append(ReviewedImage(image, ann, item.get("source", ""), verdict, label, shapes, doc, sha))
    return meta, out


# ---------------------------------------------------------------------------------------
# into the dataset
# ---------------------------------------------------------------------------------------
def _dataset_hashes(manifest) -> dict[str, str]:
    return {file_sha256(manifest.abspath(e.path)): e.path for e in manifest.entries if manifest.abspath(e.path).is_file()}


def _place(src: Path, dst: Path, sha: str, written: list[Path]) -> None:
    if dst.exists():
        if file_sha256(dst) != sha:
            raise UserError(f"{dst}: a different file of that name is already in the dataset")
        return
    _copy(src, dst)
    written.append(dst)


def _write_mask(item: ReviewedImage, dst: Path, written: list[Path]) -> None:
    from PIL import Image

    from .data.annotations import rasterise_labelme
    from .data.images import image_size

    mask, _ = rasterise_labelme(item.shapes, image_size(item.image), item.annotation)
    atomic_write(dst, lambda p: Image.fromarray(mask.astype(np.uint8) * 255).save(p, format="PNG"))
    written.append(dst)


def import_into_dataset(items: Sequence[ReviewedImage], root: PathLike, layout: str, manifest) -> dict:
    """Copy the confirmed images into the dataset at ``root`` (``layout``: ``mvtec`` or
    ``labelme``; ``manifest``: the dataset as read before, for the duplicate check).
    Returns ``{"anomalies", "normals", "skipped_duplicates", "unreviewed", "skipped",
    "written"}`` (``written``: the new files, relative to ``root``)."""
    root = Path(root)
    if layout not in ("mvtec", "labelme"):
        raise UserError(f"{root}: review import writes into mvtec or labelme datasets, not {layout!r}")
    known = _dataset_hashes(manifest)
    written: list[Path] = []
    counts = {"anomalies": 0, "normals": 0, "skipped_duplicates": [], "unreviewed": 0, "skipped": 0}
    try:
        for item in items:
            if item.verdict in ("unreviewed", "skipped"):
                counts[item.verdict] += 1
                continue
            if item.sha256 in known:
                counts["skipped_duplicates"].append({"image": item.image.name, "in_dataset": known[item.sha256]})
                continue
            known[item.sha256] = item.image.name
            name = item.image.name
            if layout == "mvtec":
                if item.verdict == "anomaly":
                    _place(item.image, root / "test" / str(item.label) / name, item.sha256, written)
                    _write_mask(item, root / "ground_truth" / str(item.label) / f"{Path(name).stem}_mask.png", written)
                else:
                    _place(item.image, root / "train" / "good" / name, item.sha256, written)
            elif item.verdict == "anomaly":
                dst = root / "test" / REVIEW_SUBFOLDER / name
                _place(item.image, dst, item.sha256, written)
                doc = {k: v for k, v in item.doc.items() if k != "recontrast"}
                doc["imagePath"], doc["imageData"] = name, None
                atomic_write_json(dst.with_suffix(".json"), doc)
                written.append(dst.with_suffix(".json"))
            else:
                _place(item.image, root / "train" / REVIEW_SUBFOLDER / name, item.sha256, written)
            counts["anomalies" if item.verdict == "anomaly" else "normals"] += 1
    except BaseException:
        remove_files(written)
        raise
    return {**counts, "written": sorted(p.relative_to(root).as_posix() for p in written)}


def remove_files(paths: Iterable[Path]) -> None:
    """Undo an import: the files it wrote (and folders it left empty)."""
    for p in paths:
        Path(p).unlink(missing_ok=True)
        parent = Path(p).parent
        while parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def card_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict:
    """What changed between two dataset cards (:mod:`recontrast_core.data.report`): the
    fingerprint, the counts, and per split the normal / anomalous counts and defect types
    (``[before, after]`` pairs, only where they differ)."""
    diff: dict[str, Any] = {"fingerprint": [before.get("fingerprint"), after.get("fingerprint")]}
    for key in ("n_images", "normal", "anomalous"):
        if before.get(key) != after.get(key):
            diff[key] = [before.get(key), after.get(key)]
    splits = {}
    for split in sorted(set(before.get("splits") or {}) | set(after.get("splits") or {})):
        a, b = (before.get("splits") or {}).get(split, {}), (after.get("splits") or {}).get(split, {})
        d = {k: [a.get(k, 0), b.get(k, 0)] for k in ("normal", "anomalous") if a.get(k, 0) != b.get(k, 0)}
        ta, tb = a.get("defect_types") or {}, b.get("defect_types") or {}
        types = {t: [ta.get(t, 0), tb.get(t, 0)] for t in sorted(set(ta) | set(tb)) if ta.get(t, 0) != tb.get(t, 0)}
        if types:
            d["defect_types"] = types
        if d:
            splits[split] = d
    if splits:
        diff["splits"] = splits
    return diff


__all__ = ["DEFAULT_BAND", "IMPORT_FILE", "REVIEW_FILE", "ReviewedImage", "card_diff", "check_band", "export_review",
           "import_into_dataset", "labelme_document", "labelme_shape", "map_regions", "read_review", "remove_files",
           "review_name", "select_for_review", "simplify_closed", "trace_outer_boundary", "trace_regions"]
