"""Write LabelMe and COCO versions of an MVTec-layout dataset (for the annotation-layout
tests): masks become polygons through simple contour tracers, images are copied so that
the three versions hold byte-identical pictures in the same train/test membership.

* :func:`centre_polygons`: Moore-neighbour tracing of each 8-connected component; the
  vertices are the centres of its boundary pixels (LabelMe's convention: Pillow fills
  the polygon with its outline, so the traced region comes back pixel for pixel).
* :func:`edge_polygons`: the outline along pixel edges (vertices at pixel corners),
  COCO's convention (pixel (x, y) covers [x, x+1) x [y, y+1)), which pycocotools fills back.

Both drop holes (LabelMe and COCO polygons cannot express them); the masks of
magnetic-tile-dev have none.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

_RING = [(0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1)]  # clockwise from west (dy, dx)


def _moore(component: np.ndarray) -> list[tuple[int, int]]:
    m = np.pad(component, 1)
    rs, cs = np.nonzero(m)
    start = (int(rs[0]), int(cs[0]))  # top-most, then left-most: its west neighbour is background
    cur, back = start, (start[0], start[1] - 1)
    out = [start]
    for _ in range(8 * int(m.sum()) + 16):
        k = _RING.index((back[0] - cur[0], back[1] - cur[1]))
        found = None
        for i in range(1, 9):
            j = (k + i) % 8
            cand = (cur[0] + _RING[j][0], cur[1] + _RING[j][1])
            if m[cand]:
                found = cand
                break
            back = cand
        if found is None:
            break  # a single pixel
        if cur == start and len(out) > 1 and found == out[1]:
            break  # would repeat the first move: the contour is closed
        cur = found
        out.append(cur)
    if len(out) > 1 and out[-1] == start:
        out.pop()
    return [(c - 1, r - 1) for r, c in out]


def centre_polygons(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """One polygon (pixel-centre vertices) per 8-connected component of ``mask``."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    return [_moore(lab == i) for i in range(1, n + 1)]


def edge_polygons(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Outer outlines along pixel edges (pixel-corner vertices), one per outer loop."""
    m = np.pad(mask.astype(bool), 1)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, c in zip(*np.nonzero(m)):  # directed edges with the foreground on the right
        if not m[r - 1, c]:
            out.setdefault((c, r), []).append((c + 1, r))
        if not m[r, c + 1]:
            out.setdefault((c + 1, r), []).append((c + 1, r + 1))
        if not m[r + 1, c]:
            out.setdefault((c + 1, r + 1), []).append((c, r + 1))
        if not m[r, c - 1]:
            out.setdefault((c, r + 1), []).append((c, r))
    loops = []
    while out:
        v0 = min(out)
        loop, prev, v = [v0], None, v0
        while True:
            nxts = out[v]
            if len(nxts) == 1 or prev is None:
                n = nxts[0]
            else:  # a corner shared by two diagonal pixels: turn right, keep them together
                din = (v[0] - prev[0], v[1] - prev[1])
                right = (-din[1], din[0])
                n = next((q for q in nxts if (q[0] - v[0], q[1] - v[1]) == right), nxts[0])
            nxts.remove(n)
            if not nxts:
                del out[v]
            prev, v = v, n
            if v == v0:
                break
            loop.append(v)
        area = sum(loop[i][0] * loop[(i + 1) % len(loop)][1] - loop[(i + 1) % len(loop)][0] * loop[i][1]
                   for i in range(len(loop)))
        if area > 0:  # outer loops (holes run the other way)
            loops.append([(x - 1, y - 1) for x, y in _simplify(loop)])
    return loops


def _simplify(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop vertices in the middle of straight runs."""
    n = len(loop)
    keep = []
    for i in range(n):
        a, b, c = loop[i - 1], loop[i], loop[(i + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0:
            keep.append(b)
    return keep or loop


def mask_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def mvtec_rows(root: Path) -> list[tuple[str, str, str, Optional[Path]]]:
    """``(split, defect type, image path relative to root, mask path | None)`` of an MVTec tree."""
    rows = []
    for split in ("train", "test"):
        for d in sorted((root / split).iterdir()):
            for f in sorted(d.iterdir()):
                mask = root / "ground_truth" / d.name / f"{f.stem}_mask.png"
                rows.append((split, d.name, f"{split}/{d.name}/{f.name}", mask if mask.is_file() else None))
    return rows


def _b64_png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_labelme(src: Path, dst: Path, *, embed: tuple[str, ...] = (), ok_regions: bool = False) -> Path:
    """A LabelMe version of the MVTec tree ``src``: ``dst/images/{train,test}/<name>``
    and ``dst/annotations/<stem>.json`` (``imagePath`` relative to the JSON file) for every
    defective image, one polygon per connected mask component, labelled with the defect
    type. Images named in ``embed`` are stored only as ``imageData`` inside their JSON.
    ``ok_regions``: every normal test image also gets a JSON with one rectangle labelled
    "ok" (the ``normal_label`` case)."""
    for split, defect, rel, mask in mvtec_rows(src):
        name = Path(rel).name
        image_dst = dst / "images" / split / name
        img = Image.open(src / rel)
        w, h = img.size
        doc = None
        if mask is not None:
            shapes = [{"label": defect, "points": [[float(x), float(y)] for x, y in poly], "group_id": None,
                       "shape_type": "polygon", "flags": {}}
                      for poly in centre_polygons(mask_of(mask)) if len(poly) >= 3]
            doc = {"version": "5.4.1", "flags": {}, "shapes": shapes}
        elif ok_regions and split == "test":
            doc = {"version": "5.4.1", "flags": {}, "shapes": [
                {"label": "ok", "points": [[1.0, 1.0], [5.0, 5.0]], "shape_type": "rectangle", "flags": {}}]}
        if doc is not None:
            doc.update({"imagePath": f"../images/{split}/{name}", "imageHeight": h, "imageWidth": w,
                        "imageData": None})
            if name in embed:
                doc["imageData"] = base64.b64encode((src / rel).read_bytes()).decode()
            (dst / "annotations").mkdir(parents=True, exist_ok=True)
            (dst / "annotations" / f"{Path(name).stem}.json").write_text(json.dumps(doc))
        if name not in embed:
            image_dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, image_dst)
    return dst


def write_coco(src: Path, dst: Path, *, rle_every: int = 0) -> Path:
    """A COCO version of the MVTec tree ``src``: ``dst/images/{train,test}/<name>`` and
    ``dst/annotations.json``; categories are the defect types; every mask component is one
    annotation with a pixel-edge polygon, except that with ``rle_every=k`` every k-th
    defective image gets one compressed RLE annotation instead."""
    from pycocotools import mask as mask_utils

    categories = sorted({d for _, d, _, m in mvtec_rows(src) if m is not None})
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    images, anns = [], []
    n_defective = 0
    for split, defect, rel, mask in mvtec_rows(src):
        name = Path(rel).name
        (dst / "images" / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, dst / "images" / split / name)
        w, h = Image.open(src / rel).size
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": f"{split}/{name}", "width": w, "height": h})
        if mask is None:
            continue
        n_defective += 1
        m = mask_of(mask)
        if rle_every and n_defective % rle_every == 0:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            segs = [{"size": [h, w], "counts": rle["counts"].decode()}]
        else:
            segs = [[[float(v) for xy in poly for v in xy]] for poly in edge_polygons(m)]
        for seg in segs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id[defect],
                         "segmentation": seg, "iscrowd": int(isinstance(seg, dict)),
                         "area": 0, "bbox": [0, 0, 1, 1]})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": cat_id[c], "name": c} for c in categories]}
    (dst / "annotations.json").write_text(json.dumps(doc))
    return dst


def small_subset(src: Path, dst: Path, n_train: int = 8, n_good: int = 4, per_defect: int = 2,
                 defects: tuple[str, ...] = ("blowhole", "break", "crack")) -> Path:
    """A small MVTec-layout copy of ``src`` (first files by name)."""
    def copy(rel: Path) -> None:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, dst / rel)

    for f in sorted((src / "train/good").iterdir())[:n_train]:
        copy(f.relative_to(src))
    for f in sorted((src / "test/good").iterdir())[:n_good]:
        copy(f.relative_to(src))
    for d in defects:
        for f in sorted((src / "test" / d).iterdir())[:per_defect]:
            copy(f.relative_to(src))
            copy(Path("ground_truth") / d / f"{f.stem}_mask.png")
    return dst
