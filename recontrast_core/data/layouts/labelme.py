"""The LabelMe layout: one folder holding images and LabelMe ``.json`` files, together or
in separate subfolders (``images/``, ``annotations/``). Masks are annotation references
rasterised on demand (:mod:`recontrast_core.data.annotations`); splits follow
:func:`~.common.assign_splits`."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ...errors import DataValidationError
from ..annotations import IMAGE_DATA, decode_b64_image, is_labelme, labelme_shapes, read_json_file
from ..images import IMAGE_EXTENSIONS, image_size, is_image_filename
from ..manifest import Manifest, make_reference
from ..validate import DatasetInvalid
from .common import PathLike, _check_split_args, _inside, _rel, _rows, _size_problem, _walk
from .registry import Layout, folder_reader, register_layout


def read_labelme(
    root: PathLike,
    normal_label: Optional[str] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    split: str = "auto",
) -> Manifest:
    """Read a folder of images and LabelMe JSON files (anywhere below ``root``).

    * An annotation belongs to the image its ``imagePath`` names (relative to the JSON
      file, as LabelMe writes it; it must stay inside ``root``), else to the one image
      below ``root`` with the same file stem as ``imagePath`` or the JSON file; with no
      such image, to the image embedded in the file (``imageData``).
    * Shapes of type polygon, rectangle, circle and mask make an image anomalous, except
      shapes labelled ``normal_label`` (teams that draw "ok" regions). An image without an
      annotation file, or whose shapes are all empty / ``normal_label``, is normal.
    * Defect type: the label of the first defect shape in file order (an image with
      several labels is counted once, under that label); an empty label reads "anomaly".
    * The mask is an annotation reference to the defect shapes, rasterised at the image's
      size when needed.
    * Splits: :func:`assign_splits` (``train/``/``test/`` folders, else the hash of the
      file name against ``test_fraction``); anomalous images go to ``test``.

    Every problem (invalid JSON, an unknown shape type, a polygon with fewer than three
    points, an ``imagePath`` outside ``root``, a missing image without ``imageData``, a
    stated size that differs from the image, two annotation files for one image) is
    collected and raised as one :class:`~recontrast_core.data.validate.DatasetInvalid`
    naming the files. JSON files that are not LabelMe annotations (no ``shapes``) and
    files other than images are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "dataset folder not found")
    _check_split_args(test_fraction, split)
    files = _walk(root)
    images = {_rel(f, root): f for f in files if is_image_filename(f)}
    by_stem: dict[str, list[str]] = defaultdict(list)
    for rel in images:
        by_stem[Path(rel).stem].append(rel)
    problems: list[tuple[str, str]] = []
    owner: dict[str, Path] = {}  # row path -> its annotation file
    annotated: dict[str, tuple[str, str]] = {}  # row path -> (defect type, mask reference)
    names: dict[str, str] = {rel: Path(rel).name for rel in images}
    n_annotations = 0

    for j in (f for f in files if f.suffix.lower() == ".json"):
        try:
            data = read_json_file(j)
        except DataValidationError as exc:
            problems.append((str(j), exc.problem))
            continue
        if not is_labelme(data):
            continue
        n_annotations += 1
        shapes, shape_problems = labelme_shapes(data, j)
        problems.extend((str(j), p) for p in shape_problems)
        target, problem = _labelme_target(j, data, root, images, by_stem)
        if problem:
            problems.append((str(j), problem))
            continue
        assert target is not None
        if target in owner:
            problems.append((str(j), f"annotates the same image ({target}) as {owner[target]}"))
            continue
        owner[target] = j
        if target not in images:  # the embedded image
            ip = data.get("imagePath")
            names[target] = Path(str(ip).replace("\\", "/")).name if isinstance(ip, str) and ip.strip() else j.name
            try:
                with decode_b64_image(data.get("imageData") or "", j, "imageData") as img:
                    actual = img.size
            except DataValidationError as exc:
                problems.append((str(j), exc.problem))
                continue
        else:
            try:
                actual = image_size(images[target])
            except DataValidationError:
                actual = None  # validation reports the unreadable image itself
        if actual is not None:
            problem = _size_problem((data.get("imageWidth"), data.get("imageHeight")), actual, target)
            if problem:
                problems.append((str(j), problem))
                continue
        defects = [s for s in shapes if normal_label is None or s.label != normal_label]
        if defects and not shape_problems and actual is not None:
            ref = make_reference(_rel(j, root),
                                 f"labelme:{','.join(str(s.index) for s in defects)}:{actual[0]}x{actual[1]}")
            annotated[target] = (defects[0].label or "anomaly", ref)
        elif not defects:
            annotated.pop(target, None)

    rows_in = sorted(set(images) | set(owner))
    if not rows_in:
        problems.append((str(root), "no images found (LabelMe layout: images and their .json annotation files "
                                    f"below the folder; accepted image types: {', '.join(IMAGE_EXTENSIONS)})"))
    if problems:
        raise DatasetInvalid(problems)
    hint_paths = {p: (_rel(owner[p], root) if p not in images else p) for p in rows_in}
    entries = _rows([(p, names[p], hint_paths[p], annotated.get(p)) for p in rows_in], test_fraction, seed, split)
    return Manifest(root=str(root), entries=entries, has_masks=True)


def _labelme_target(j: Path, data: dict, root: Path, images: dict[str, Path],
                    by_stem: dict[str, list[str]]) -> tuple[Optional[str], Optional[str]]:
    """(row path of the image ``j`` annotates, None) or (None, problem)."""
    ip = data.get("imagePath")
    stems = []
    if isinstance(ip, str) and ip.strip():
        ipn = ip.strip().replace("\\", "/")
        cand = Path(ipn) if Path(ipn).is_absolute() else j.parent / ipn
        if not _inside(cand, root):
            return None, (f"imagePath {ip!r} points outside the dataset folder {root} (refused: every image "
                          "must lie inside the dataset; make imagePath relative to the annotation file)")
        rel = _rel(cand.resolve(), root.resolve())
        if rel in images:
            return rel, None
        if cand.is_file():
            return None, (f"imagePath {ip!r} is not an accepted image type ({', '.join(IMAGE_EXTENSIONS)})")
        stems.append(Path(ipn).stem)
    stems.append(j.stem)
    for stem in dict.fromkeys(stems):
        hits = by_stem.get(stem, [])
        if len(hits) == 1:
            return hits[0], None
        if len(hits) > 1:
            return None, (f"imagePath {ip!r} not found and several images have the stem {stem!r} "
                          f"({', '.join(hits)}); set imagePath to the right one")
    if isinstance(data.get("imageData"), str) and data["imageData"]:
        return make_reference(_rel(j, root), f"labelme:{IMAGE_DATA}"), None
    return None, (f"image not found: imagePath {ip!r} does not exist inside the dataset, no image named "
                  f"{stems[-1]}.<ext> or {stems[0]}.<ext> below it, and the file has no imageData")


def _looks_like_labelme(root: Path, limit: int = 20) -> bool:
    """True when one of the first ``limit`` .json files below ``root`` is a LabelMe file."""
    checked = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.lower().endswith(".json") and not f.startswith(".") and f != "manifest.json":
                try:
                    if is_labelme(read_json_file(Path(dirpath) / f)):
                        return True
                except DataValidationError:
                    pass
                checked += 1
                if checked >= limit:
                    return False
    return False


register_layout(Layout(
    "labelme", "images + LabelMe .json files", folder_reader("labelme", read_labelme),
    options=("normal_label", "test_fraction", "seed", "split"),
    detect=lambda p: p.is_dir() and _looks_like_labelme(p), priority=30,
))
