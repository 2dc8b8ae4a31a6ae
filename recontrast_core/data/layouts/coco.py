"""The COCO layout: an instances JSON (``annotations=``) and an image folder (``images=``,
default the root); polygons, RLE and boxes. Splits follow :func:`~.common.assign_splits`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ...errors import DataValidationError, UserError
from ..annotations import parse_coco, read_json_file
from ..images import image_size
from ..manifest import Manifest, make_reference
from ..validate import DatasetInvalid
from .common import PathLike, _check_split_args, _inside, _rel, _rel_or_abs, _rows, _size_problem, _under
from .registry import Layout, folder_reader, register_layout


def _find_coco_file(root: Path) -> Path:
    cands = [p for p in sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json"))
             if p.name != "manifest.json"]
    if len(cands) == 1:
        return cands[0]
    raise UserError(f"{root}: the coco layout needs annotations=<instances .json file> (relative to the "
                    f"dataset root); found {len(cands)} candidate .json files")


def read_coco(
    root: PathLike,
    annotations: Optional[PathLike] = None,
    images: Optional[PathLike] = None,
    normal_label: Optional[str] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    split: str = "auto",
) -> Manifest:
    """Read a COCO instances file and its images.

    ``annotations``: the JSON file (relative paths are relative to ``root``; default the
    one ``.json`` file in ``root`` or ``root/annotations/``); ``images``: the folder the
    images' ``file_name`` are relative to (default ``root``). Every image listed in the file
    becomes a row (files not listed are ignored). Its annotations (segmentation polygons,
    RLE, or the bbox when there is no segmentation) make it anomalous, except those of
    category ``normal_label``; its defect type is the category of its first annotation in
    file order. Images with no annotation are normal and split like LabelMe's
    (:func:`assign_splits`, on the path below ``images``). Problems (invalid JSON, an
    annotation referring to an unknown image or category, a polygon with fewer than three
    points, a missing image, a stated width/height that differs from the image, a
    file_name outside the image folder) are collected and raised naming the files.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "dataset folder not found")
    _check_split_args(test_fraction, split)
    ann_path = _under(root, annotations) if annotations else _find_coco_file(root)
    img_dir = _under(root, images) if images else root
    if not ann_path.is_file():
        raise DataValidationError(ann_path, "COCO annotation file not found")
    if not img_dir.is_dir():
        raise DataValidationError(img_dir, "COCO image folder not found")
    index, coco_problems = parse_coco(read_json_file(ann_path), ann_path)
    problems: list[tuple[str, str]] = [(str(ann_path), p) for p in coco_problems]
    ann_rel = _rel_or_abs(ann_path, root)
    rows: list[tuple[str, str, str, Optional[tuple[str, str]]]] = []
    seen: dict[str, Any] = {}
    for image_id, im in index.images.items():
        name = im["file_name"].replace("\\", "/")
        path = img_dir / name
        if Path(name).is_absolute() or not _inside(path, img_dir):
            problems.append((str(ann_path), f"image id {image_id!r}: file_name {im['file_name']!r} points outside "
                                            f"the image folder {img_dir} (refused)"))
            continue
        if not path.is_file():
            problems.append((str(path), f"image not found (image id {image_id!r} of {ann_path})"))
            continue
        row = _rel_or_abs(path, root)
        if row in seen:
            problems.append((str(ann_path), f"image ids {seen[row]!r} and {image_id!r} name the same file {name}"))
            continue
        seen[row] = image_id
        try:
            actual = image_size(path)
        except DataValidationError:
            actual = None  # validation reports the unreadable image itself
        if actual is not None:
            problem = _size_problem((im["width"], im["height"]), actual, str(path))
            if problem:
                problems.append((str(ann_path), f"image id {image_id!r}: {problem}"))
                continue
        anns = [a for a in index.by_image.get(image_id, [])
                if normal_label is None or index.categories[a["category_id"]] != normal_label]
        anomaly = None
        if anns:
            ids = ",".join(str(a["id"]) for a in anns)
            ref = make_reference(ann_rel, f"coco:{ids}:{im['width']}x{im['height']}")
            anomaly = (index.categories[anns[0]["category_id"]], ref)
        # the split hint reads the path below the image folder
        rows.append((row, Path(name).name, _rel(path, img_dir), anomaly))
    if not rows and not problems:
        problems.append((str(ann_path), "the file lists no images"))
    if problems:
        raise DatasetInvalid(problems)
    entries = _rows(rows, test_fraction, seed, split)
    return Manifest(root=str(root), entries=entries, has_masks=True)



register_layout(Layout(
    "coco", "annotations=<instances.json>, images=<folder>", folder_reader("coco", read_coco),
    options=("annotations", "images", "normal_label", "test_fraction", "seed", "split"),
    path_options=("annotations", "images"),
))
