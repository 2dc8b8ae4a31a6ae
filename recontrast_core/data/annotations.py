"""Annotation files as pixels: LabelMe and COCO parsing (with the checks that name the
file), rasterising their shapes into masks, and images embedded in LabelMe files.

Design: a reader never writes masks to disk. A manifest row whose mask comes from an
annotation file stores an **annotation reference** in ``mask_path``
(``annotation:<file>#<selector>``, see :mod:`recontrast_core.data.manifest`), and this
module turns the reference into a ``bool [H, W]`` mask whenever pixels are needed
(validation, the image cache, the dataset report). So the manifest stays a small text
file, its fingerprint covers the annotation file (``Manifest.with_hashes`` hashes it), and
a corrected annotation changes the fingerprint and the cache keys like a corrected mask
PNG would. :func:`load_source_image` / :func:`load_source_mask` accept a path or an
:class:`~recontrast_core.data.manifest.AnnotationRef` and are what the cache and the
validator call; plain paths go to :mod:`recontrast_core.data.images` unchanged.

Coordinate conventions (each format's own):

* **LabelMe**: points are pixel centres (x right, y down), drawn the way LabelMe itself
  converts shapes to masks (``labelme.utils.shape_to_mask``): Pillow ``ImageDraw`` with
  the outline included. ``polygon``: the points (at least three); ``rectangle``: two
  opposite corners; ``circle``: centre and a point on the circle; ``mask``: a base64 PNG
  covering the box between its two points (top-left at the first). Other LabelMe types
  (``line``, ``linestrip``, ``point``, ``points``) do not enclose a region and are refused.
* **COCO**: pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``; polygons and RLE (compressed
  or not) are rasterised by ``pycocotools``; an annotation without a segmentation uses its
  ``bbox`` as a rectangle.

Points outside the image are clipped (drawing stops at the border); the count comes back
with the mask so that validation can warn, naming the file.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataValidationError
from .images import _describe, load_image_rgb, load_mask, open_image, to_rgb_array
from .manifest import AnnotationRef, file_sha256

Source = Union[str, os.PathLike, AnnotationRef]

#: LabelMe shape types that enclose a region (rasterised into the mask).
LABELME_REGION_TYPES = ("polygon", "rectangle", "circle", "mask")
#: LabelMe shape types that exist but enclose no region (refused with a clear message).
LABELME_OTHER_TYPES = ("line", "linestrip", "point", "points")
#: The selector of an image embedded in a LabelMe file.
IMAGE_DATA = "imageData"


# --------------------------------------------------------------------------------------
# JSON files
# --------------------------------------------------------------------------------------
def read_json_file(path: Union[str, os.PathLike]) -> Any:
    """Parse a JSON file within the tool's depth and size limits
    (:func:`recontrast_core.runtime.load_json`); unreadable, invalid, too deep or too large
    JSON raises DataValidationError naming it."""
    from ..runtime import load_json

    def error(p: Path, problem: str) -> DataValidationError:
        if problem.startswith("cannot read"):
            problem = problem.replace("cannot read", "cannot read annotation file", 1)
        return DataValidationError(p, problem)

    return load_json(Path(path), error)


@functools.lru_cache(maxsize=16)
def _cached(path: str, mtime_ns: int, size: int, kind: str) -> Any:
    data = read_json_file(path)
    if kind == "coco":
        index, problems = parse_coco(data, path)
        if problems:
            raise DataValidationError(path, problems[0])
        return index
    return data


def _load_cached(path: Path, kind: str) -> Any:
    """A parsed annotation file, re-read when it changes (a COCO file is parsed once for
    all of its images, not once per mask)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataValidationError(path, "annotation file not found") from exc
    return _cached(str(path), st.st_mtime_ns, st.st_size, kind)


# --------------------------------------------------------------------------------------
# LabelMe
# --------------------------------------------------------------------------------------
def is_labelme(data: Any) -> bool:
    """A LabelMe annotation: a JSON object with a ``shapes`` list (other JSON files, e.g. a
    manifest or a COCO file lying in the folder, are not)."""
    return isinstance(data, dict) and "shapes" in data and "images" not in data


@dataclass
class LabelmeShape:
    index: int  # position in the file's "shapes" list
    label: str
    shape_type: str
    points: list[tuple[float, float]] = field(default_factory=list)
    mask_b64: Optional[str] = None


def _points(raw: Any) -> Optional[list[tuple[float, float]]]:
    if not isinstance(raw, list):
        return None
    out = []
    for p in raw:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
                or not all(math.isfinite(v) for v in p)):
            return None
        out.append((float(p[0]), float(p[1])))
    return out


def labelme_shapes(data: dict, path: Union[str, os.PathLike]) -> tuple[list[LabelmeShape], list[str]]:
    """The region shapes of a LabelMe file and the problems found (one string each, the
    file is named by the caller): not a list, an unknown or non-region shape type, bad
    points, a polygon with fewer than three points, a rectangle/circle/mask without two
    points, a mask shape without its PNG."""
    shapes_raw = data.get("shapes")
    if shapes_raw is None:
        return [], []
    if not isinstance(shapes_raw, list):
        return [], ["'shapes' is not a list"]
    shapes: list[LabelmeShape] = []
    problems: list[str] = []
    for i, s in enumerate(shapes_raw):
        if not isinstance(s, dict):
            problems.append(f"shape {i} is not a JSON object")
            continue
        label = s.get("label")
        label = str(label).strip() if label is not None else ""
        what = f"shape {i} ({label!r})"
        kind = s.get("shape_type") or "polygon"  # LabelMe's default
        if kind not in LABELME_REGION_TYPES:
            if kind in LABELME_OTHER_TYPES:
                problems.append(f"{what}: shape type {kind!r} encloses no region; accepted: "
                                f"{', '.join(LABELME_REGION_TYPES)} (redraw it as a polygon)")
            else:
                problems.append(f"{what}: unknown shape type {kind!r}; accepted: {', '.join(LABELME_REGION_TYPES)}")
            continue
        pts = _points(s.get("points"))
        if pts is None:
            problems.append(f"{what}: 'points' must be a list of [x, y] number pairs")
            continue
        if kind == "polygon" and len(pts) < 3:
            problems.append(f"{what}: polygon with {len(pts)} point{'s' if len(pts) != 1 else ''} "
                            "(a polygon needs at least 3)")
            continue
        if kind in ("rectangle", "circle", "mask") and len(pts) != 2:
            problems.append(f"{what}: a {kind} needs exactly 2 points, not {len(pts)}")
            continue
        mask_b64 = s.get("mask")
        if kind == "mask" and not isinstance(mask_b64, str):
            problems.append(f"{what}: a mask shape needs its 'mask' (a base64 PNG)")
            continue
        shapes.append(LabelmeShape(i, label, kind, pts, mask_b64 if kind == "mask" else None))
    return shapes, problems


def decode_b64_image(b64: str, path: Union[str, os.PathLike], what: str) -> Image.Image:
    """A decoded Pillow image from base64 text (LabelMe ``imageData`` / mask PNGs)."""
    try:
        raw = base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise DataValidationError(path, f"{what} is not valid base64 ({_describe(exc)})") from exc
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as exc:
        raise DataValidationError(path, f"{what} is not a readable image ({_describe(exc)})") from exc
    return img


def embedded_image_bytes(data: dict, path: Union[str, os.PathLike]) -> bytes:
    b64 = data.get("imageData")
    if not isinstance(b64, str) or not b64:
        raise DataValidationError(path, "no imageData in the annotation file")
    try:
        return base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise DataValidationError(path, f"imageData is not valid base64 ({_describe(exc)})") from exc


def _outside(points: list[tuple[float, float]], w: int, h: int, hi_x: float, hi_y: float) -> int:
    return sum(1 for x, y in points if x < 0 or y < 0 or x > hi_x or y > hi_y)


def rasterise_labelme(shapes: list[LabelmeShape], size: tuple[int, int],
                      path: Union[str, os.PathLike] = "") -> tuple[np.ndarray, int]:
    """``(bool [H, W] mask, points outside the image)`` of ``shapes`` at ``size`` (W, H)."""
    w, h = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    outside = 0
    pastes = []
    for s in shapes:
        outside += _outside(s.points, w, h, w - 1, h - 1)
        if s.shape_type == "polygon":
            draw.polygon(s.points, fill=1, outline=1)
        elif s.shape_type == "rectangle":
            (x0, y0), (x1, y1) = s.points
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=1, outline=1)
        elif s.shape_type == "circle":
            (cx, cy), (px, py) = s.points
            r = math.hypot(px - cx, py - cy)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1, outline=1)
        elif s.shape_type == "mask":
            img = decode_b64_image(s.mask_b64 or "", path, f"shape {s.index} ({s.label!r}) mask")
            with img:
                part = np.asarray(img.convert("L")) > 0
            x0 = int(round(min(p[0] for p in s.points)))
            y0 = int(round(min(p[1] for p in s.points)))
            pastes.append((x0, y0, part))
    out = np.array(canvas, dtype=np.uint8) > 0
    for x0, y0, part in pastes:  # the box's top-left at (x0, y0), clipped at the border
        ph, pw = part.shape
        dx0, dy0, dx1, dy1 = max(0, x0), max(0, y0), min(w, x0 + pw), min(h, y0 + ph)
        if dx1 > dx0 and dy1 > dy0:
            out[dy0:dy1, dx0:dx1] |= part[dy0 - y0:dy1 - y0, dx0 - x0:dx1 - x0]
    return out, outside


# --------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------
@dataclass
class CocoIndex:
    images: dict[Any, dict]  # id -> image record
    categories: dict[Any, str]  # id -> name
    annotations: dict[Any, dict]  # id -> annotation
    by_image: dict[Any, list[dict]]  # image id -> annotations in file order


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_coco(data: Any, path: Union[str, os.PathLike]) -> tuple[CocoIndex, list[str]]:
    """Index a COCO instances file; problems (strings, the file named by the caller):
    missing sections, duplicate ids, an image without file_name/width/height, an annotation
    referring to an unknown image or category, a polygon with fewer than three points, an
    RLE without counts/size."""
    problems: list[str] = []
    empty = CocoIndex({}, {}, {}, {})
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return empty, ["not a COCO annotation file (no 'images' list)"]
    images: dict[Any, dict] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            problems.append(f"images[{i}] has no 'id'")
            continue
        if im["id"] in images:
            problems.append(f"image id {im['id']!r} is listed twice")
            continue
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            problems.append(f"image id {im['id']!r} has no file_name")
            continue
        if not (_is_int(im.get("width")) and _is_int(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            problems.append(f"image id {im['id']!r} ({im['file_name']}) has no positive integer width/height")
            continue
        images[im["id"]] = im
    categories: dict[Any, str] = {}
    for i, c in enumerate(data.get("categories") or []):
        if not isinstance(c, dict) or "id" not in c:
            problems.append(f"categories[{i}] has no 'id'")
            continue
        categories[c["id"]] = str(c.get("name") or c["id"])
    anns: dict[Any, dict] = {}
    by_image: dict[Any, list[dict]] = {}
    raw_anns = data.get("annotations") or []
    if not isinstance(raw_anns, list):
        return empty, ["'annotations' is not a list"]
    for i, a in enumerate(raw_anns):
        if not isinstance(a, dict) or "id" not in a:
            problems.append(f"annotations[{i}] has no 'id'")
            continue
        aid = a["id"]
        if aid in anns:
            problems.append(f"annotation id {aid!r} is listed twice")
            continue
        if a.get("image_id") not in images:
            problems.append(f"annotation {aid!r} refers to unknown image id {a.get('image_id')!r}")
            continue
        if a.get("category_id") not in categories:
            problems.append(f"annotation {aid!r} refers to unknown category id {a.get('category_id')!r}")
            continue
        problem = _check_coco_geometry(a, images[a["image_id"]])
        if problem:
            problems.append(f"annotation {aid!r}: {problem}")
            continue
        anns[aid] = a
        by_image.setdefault(a["image_id"], []).append(a)
    return CocoIndex(images, categories, anns, by_image), problems


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                       for x in v)


def _check_coco_geometry(a: dict, image: dict) -> Optional[str]:
    seg = a.get("segmentation")
    if seg:
        if isinstance(seg, list):
            for j, poly in enumerate(seg):
                if not _numbers(poly) or len(poly) % 2:
                    return f"polygon {j} is not a flat list of x, y numbers"
                if len(poly) < 6:
                    return f"polygon {j} has {len(poly) // 2} point(s) (a polygon needs at least 3)"
            return None
        if isinstance(seg, dict):
            if "counts" not in seg or not isinstance(seg.get("size"), list) or len(seg["size"]) != 2:
                return "RLE segmentation needs 'counts' and 'size' [height, width]"
            if list(seg["size"]) != [image["height"], image["width"]]:
                return (f"RLE size {seg['size']} differs from the image's [height, width] "
                        f"[{image['height']}, {image['width']}]")
            return None
        return "segmentation must be a list of polygons or an RLE object"
    bbox = a.get("bbox")
    if not (_numbers(bbox) and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0):
        return "no segmentation and no usable bbox [x, y, width, height]"
    return None


def rasterise_coco(anns: list[dict], size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """``(bool [H, W] mask, coordinates outside the image)`` of COCO annotations."""
    from pycocotools import mask as mask_utils

    w, h = size
    rles = []
    outside = 0
    for a in anns:
        seg = a.get("segmentation")
        if isinstance(seg, list) and seg:
            polys = [[float(v) for v in p] for p in seg]
            for p in polys:
                outside += _outside(list(zip(p[0::2], p[1::2])), w, h, w, h)
            rles.extend(mask_utils.frPyObjects(polys, h, w))
        elif isinstance(seg, dict) and seg:
            if isinstance(seg["counts"], list):
                rles.extend(mask_utils.frPyObjects([seg], h, w))
            else:
                counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
                rles.append({"size": [h, w], "counts": counts})
        else:
            x, y, bw, bh = (float(v) for v in a["bbox"])
            outside += _outside([(x, y), (x + bw, y + bh)], w, h, w, h)
            rles.extend(mask_utils.frPyObjects(np.array([[x, y, bw, bh]], dtype=np.float64), h, w))
    if not rles:
        return np.zeros((h, w), dtype=bool), outside
    merged = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= notice; the result is right
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = mask_utils.decode(merged)
    return np.ascontiguousarray(decoded.astype(bool)), outside


# --------------------------------------------------------------------------------------
# References -> pixels
# --------------------------------------------------------------------------------------
def parse_selector(ref: AnnotationRef) -> tuple[str, Optional[list], Optional[tuple[int, int]]]:
    """``(format, ids | None, (W, H) | None)``; ids are None for an embedded image."""
    parts = ref.selector.split(":")
    fmt = parts[0]
    try:
        if fmt == "labelme" and parts[1:] == [IMAGE_DATA]:
            return fmt, None, None
        if fmt in ("labelme", "coco") and len(parts) == 3:
            ids_text, size_text = parts[1], parts[2]
            ids: list = [int(v) if v.lstrip("-").isdigit() else v for v in ids_text.split(",") if v]
            w, h = (int(v) for v in size_text.lower().split("x"))
            return fmt, ids, (w, h)
    except ValueError:
        pass
    raise DataValidationError(ref.file, f"malformed annotation selector {ref.selector!r}")


def reference_mask(ref: AnnotationRef) -> tuple[np.ndarray, int]:
    """``(bool [H, W] mask, points outside the image)`` of a mask reference."""
    fmt, ids, size = parse_selector(ref)
    if ids is None or size is None:
        raise DataValidationError(ref.file, f"{ref.selector!r} is an image, not a mask")
    if fmt == "labelme":
        data = _load_cached(ref.file, "labelme")
        shapes, problems = labelme_shapes(data if isinstance(data, dict) else {}, ref.file)
        if problems:
            raise DataValidationError(ref.file, problems[0])
        by_index = {s.index: s for s in shapes}
        missing = [i for i in ids if i not in by_index]
        if missing:
            raise DataValidationError(ref.file, f"shape(s) {missing} not in the file (was it edited after ingest?)")
        return rasterise_labelme([by_index[i] for i in ids], size, ref.file)
    index: CocoIndex = _load_cached(ref.file, "coco")
    missing = [i for i in ids if i not in index.annotations]
    if missing:
        raise DataValidationError(ref.file, f"annotation id(s) {missing} not in the file (was it edited after ingest?)")
    return rasterise_coco([index.annotations[i] for i in ids], size)


def embedded_image(ref: AnnotationRef) -> Image.Image:
    """The decoded image embedded in a LabelMe file (``imageData``)."""
    data = _load_cached(ref.file, "labelme")
    if not isinstance(data, dict):
        raise DataValidationError(ref.file, "not a LabelMe annotation")
    return decode_b64_image(data.get("imageData") or "", ref.file, "imageData")


def load_source_image(src: Source) -> np.ndarray:
    """``uint8 [H, W, 3]`` from a path (:func:`~recontrast_core.data.images.load_image_rgb`)
    or from an embedded-image reference (same conversion rules)."""
    if not isinstance(src, AnnotationRef):
        return load_image_rgb(src)
    img = embedded_image(src)
    try:
        return to_rgb_array(img)
    except Exception as exc:
        raise DataValidationError(src.file, f"unsupported embedded image ({_describe(exc)})") from exc
    finally:
        img.close()


def load_source_mask(src: Source) -> np.ndarray:
    """``bool [H, W]`` from a mask file (:func:`~recontrast_core.data.images.load_mask`) or
    a rasterised annotation reference."""
    if not isinstance(src, AnnotationRef):
        return load_mask(src)
    return reference_mask(src)[0]


def source_sha256(src: Source) -> str:
    """sha256 of an image's bytes: the file, or the bytes embedded in the LabelMe file
    (so the same picture has the same hash whichever way it is stored)."""
    if not isinstance(src, AnnotationRef):
        return file_sha256(Path(src))
    data = _load_cached(src.file, "labelme")
    return hashlib.sha256(embedded_image_bytes(data if isinstance(data, dict) else {}, src.file)).hexdigest()


def source_info(src: Source, decode: bool = True) -> tuple[tuple[int, int], str]:
    """``((W, H), mode)`` of an image source (header only for files unless ``decode``)."""
    if not isinstance(src, AnnotationRef):
        with open_image(src, decode=decode) as img:
            return img.size, img.mode
    with embedded_image(src) as img:
        return img.size, img.mode
