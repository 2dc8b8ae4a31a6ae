"""Dataset layouts on disk, read into a :class:`~recontrast_core.data.manifest.Manifest`.

Accepted layouts:

* **MVTec AD** (:func:`read_mvtec`)::

      root/train/good/*                       normal training images
      root/test/good/*                        normal test images
      root/test/<defect>/*                    anomalous test images
      root/ground_truth/<defect>/<stem>_mask.png   masks (optional folder; ``<stem>.png``
                                              or any image extension is accepted too)

* **plain folders** (:func:`read_folder`): a folder of normal images, optionally a folder
  of anomalous images (flat, or one subfolder per defect type) and a mask folder whose
  files match the anomalous images by stem.

* **LabelMe** (:func:`read_labelme`): one folder holding images and LabelMe ``.json``
  files, together or in separate subfolders (``images/``, ``annotations/``). Masks are
  annotation references rasterised on demand (:mod:`recontrast_core.data.annotations`).

* **COCO** (:func:`read_coco`): an instances JSON (``annotations=``) and an image folder
  (``images=``, default the root); polygons, RLE and boxes.

* **VisA** (:func:`read_visa`): the VisA split CSV (``object,split,label,image,mask``).

* a saved ``manifest.json`` (:func:`read_dataset` only).

The split rule of the annotation layouts (LabelMe, COCO) is :func:`assign_splits`: an
image below a folder named ``train`` or ``test`` (anywhere in its path) goes to that split
(``split="auto"``, the default); every other normal image goes to ``test`` when
``hash_fraction(file name, seed) < test_fraction`` (default 0.2), else ``train``, exactly
like :func:`read_folder`; anomalous images always go to ``test``. ``split="hash"`` ignores
the folders. docs/data.md describes every layout and its options.

The readers do not judge files: every entry found in an image folder becomes a manifest
row, including a stray ``notes.txt``, ``Thumbs.db`` or a subfolder, so that
:func:`~recontrast_core.data.validate.validate_manifest` reports it by name instead of it
being silently ignored. Only hidden entries (names starting with ``.``, e.g.
``.DS_Store``, ``.ipynb_checkpoints``) are skipped. Structural mistakes that leave no
sensible row to write (a file directly in ``test/``, a missing ``train/good/``) raise
:class:`~recontrast_core.errors.DataValidationError` at once.

Order is deterministic: rows are sorted by split (train first), defect type, file name.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from ..errors import DataValidationError, UserError
from .annotations import (
    IMAGE_DATA,
    decode_b64_image,
    is_labelme,
    labelme_shapes,
    parse_coco,
    read_json_file,
)
from .images import IMAGE_EXTENSIONS, image_size, is_image_filename
from .manifest import Manifest, ManifestEntry, make_reference
from .validate import DatasetInvalid

PathLike = os.PathLike | str

ACCEPTED_LAYOUTS_HELP = (
    "accepted layouts: 'mvtec' (root/train/good/*, root/test/<defect>/*, optional "
    "root/ground_truth/<defect>/<stem>_mask.png), 'folder' (normal_dir=..., optional "
    "abnormal_dir=..., mask_dir=...), 'labelme' (images + LabelMe .json files), 'coco' "
    "(annotations=<instances.json>, images=<folder>), 'visa' (split_csv=<csv>), or a "
    "manifest.json file (docs/data.md)"
)

#: Options each layout accepts (``read_dataset(path, layout, **options)``; the settings'
#: ``data.layout_options``).
LAYOUT_OPTIONS: dict[str, tuple[str, ...]] = {
    "mvtec": (),
    "folder": ("normal_dir", "abnormal_dir", "mask_dir", "test_fraction", "seed"),
    "labelme": ("normal_label", "test_fraction", "seed", "split"),
    "coco": ("annotations", "images", "normal_label", "test_fraction", "seed", "split"),
    "visa": ("split_csv", "object"),
    "manifest": (),
}
#: Options that name a file or folder: relative values are relative to the dataset root.
PATH_OPTIONS = ("normal_dir", "abnormal_dir", "mask_dir", "annotations", "images", "split_csv")
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


# --------------------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------------------
def read_mvtec(root: PathLike) -> Manifest:
    """Read an MVTec-AD-layout folder (one category) into a manifest; paths relative to root."""
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "dataset folder not found")
    train_good = root / "train" / "good"
    if not train_good.is_dir():
        raise DataValidationError(
            root, "no train/good/ folder, so not an MVTec-layout dataset; " + ACCEPTED_LAYOUTS_HELP
        )
    for extra in _children(root / "train"):
        if extra.name != "good":
            raise DataValidationError(
                extra, "unexpected entry in train/: the MVTec layout trains on train/good/ only"
            )

    gt_root = root / "ground_truth"
    has_masks = gt_root.is_dir()
    entries: list[ManifestEntry] = []
    for p in _children(train_good):
        entries.append(ManifestEntry(path=_rel(p, root), label=0, defect_type="good", split="train"))

    test_root = root / "test"
    if test_root.is_dir():
        for defect_dir in _children(test_root):
            if not defect_dir.is_dir():
                raise DataValidationError(
                    defect_dir,
                    "unexpected file in test/: expected one subfolder per defect type "
                    "(test/good/, test/<defect>/)",
                )
            defect = defect_dir.name
            label = 0 if defect == "good" else 1
            for p in _children(defect_dir):
                mask = None
                if label == 1 and has_masks:
                    mask = _find_mask(p.stem, [gt_root / defect])
                entries.append(
                    ManifestEntry(
                        path=_rel(p, root),
                        label=label,
                        defect_type=defect,
                        mask_path=_rel(mask, root) if mask is not None else None,
                        split="test",
                    )
                )
    return Manifest(root=str(root), entries=entries, has_masks=has_masks)


# --------------------------------------------------------------------------------------
# Plain folders
# --------------------------------------------------------------------------------------
def hash_fraction(name: str, seed: int = 0) -> float:
    """A number in [0, 1) from sha1 of ``"<seed>:<name>"``: stable per file name, so adding
    or removing other files never moves this one between splits."""
    digest = hashlib.sha1(f"{seed}:{name}".encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / float(16**15)


def read_folder(
    normal_dir: PathLike,
    abnormal_dir: Optional[PathLike] = None,
    mask_dir: Optional[PathLike] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Manifest:
    """Read plain folders into a manifest.

    * Normal images (label 0): file ``f`` goes to ``test`` when
      ``hash_fraction(f.name, seed) < test_fraction``, else to ``train``. If that would
      leave no training image, the file with the largest hash stays in ``train``.
    * Anomalous images (label 1), all in ``test``: files directly in ``abnormal_dir`` get
      defect type ``"anomaly"``; files in a subfolder ``abnormal_dir/<type>/`` get
      ``<type>``.
    * Masks, matched by stem in ``mask_dir/<type>/`` first, then ``mask_dir/``:
      ``<stem>_mask.png``, ``<stem>.png``, or either base with any image extension.
      ``has_masks`` is true when ``mask_dir`` is given.

    ``root`` is the folders' deepest common parent and paths are stored relative to it;
    where the folders share no parent but the filesystem root, absolute paths are stored.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test_fraction must be in [0, 1), not {test_fraction}")
    normal = Path(os.path.abspath(normal_dir))
    abnormal = Path(os.path.abspath(abnormal_dir)) if abnormal_dir is not None else None
    masks = Path(os.path.abspath(mask_dir)) if mask_dir is not None else None
    for what, folder in (("normal", normal), ("abnormal", abnormal), ("mask", masks)):
        if folder is not None and not folder.is_dir():
            raise DataValidationError(folder, f"{what} image folder not found")

    given = [f for f in (normal, abnormal, masks) if f is not None]
    common = Path(os.path.commonpath([str(f) for f in given]))
    if common == Path(common.anchor):  # nothing shared but "/" (or a drive)
        root, absolute = normal.parent, True
    else:
        root, absolute = common, False

    def rel(p: Path) -> str:
        return str(p) if absolute else _rel(p, root)

    skip = {f for f in given if f != normal}

    normal_rows = [p for p in _children(normal) if p not in skip]
    fracs = {p: hash_fraction(p.name, seed) for p in normal_rows}
    in_test = {p for p in normal_rows if fracs[p] < test_fraction}
    if normal_rows and len(in_test) == len(normal_rows):
        in_test.discard(max(normal_rows, key=lambda p: (fracs[p], p.name)))

    train_rows: list[ManifestEntry] = []
    test_rows: list[ManifestEntry] = []
    for p in normal_rows:
        e = ManifestEntry(path=rel(p), label=0, defect_type="good",
                          split="test" if p in in_test else "train")
        (test_rows if p in in_test else train_rows).append(e)

    if abnormal is not None:
        loose: list[tuple[str, Path]] = []
        nested: list[tuple[str, Path]] = []
        for child in _children(abnormal):
            if child in skip:
                continue
            if child.is_dir():
                nested.extend((child.name, p) for p in _children(child))
            else:
                loose.append(("anomaly", child))
        for defect, p in sorted(loose + nested, key=lambda t: (t[0], t[1].name)):
            mask = None
            if masks is not None:
                folders = [masks / defect, masks] if defect != "anomaly" else [masks]
                mask = _find_mask(p.stem, folders)
            test_rows.append(
                ManifestEntry(
                    path=rel(p), label=1, defect_type=defect,
                    mask_path=rel(mask) if mask is not None else None, split="test",
                )
            )

    test_rows.sort(key=lambda e: (e.label, e.defect_type, e.path))
    return Manifest(root=str(root), entries=train_rows + test_rows, has_masks=masks is not None)


# --------------------------------------------------------------------------------------
# Shared by the annotation layouts
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# LabelMe
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------
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


def _under(root: Path, value: PathLike) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def _rel_or_abs(path: Path, root: Path) -> str:
    """Relative to root when below it, else absolute (a manifest travels with its root)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(Path(os.path.abspath(path)))


# --------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def read_visa(root: PathLike, split_csv: Optional[PathLike] = None, object: Optional[str] = None) -> Manifest:  # noqa: A002
    """Read a VisA-style split CSV (columns ``object,split,label,image,mask``).

    ``split_csv`` defaults to ``root/split_csv/1cls.csv`` (VisA's own); relative paths are
    relative to ``root``. ``split`` is ``train`` / ``test``; ``label`` is ``normal`` or
    ``anomaly`` (defect type ``anomaly``); ``image`` and ``mask`` are relative to the
    CSV's folder or to ``root`` (the first that exists). The CSV may hold several objects:
    ``object`` selects one, and is required when there are several. Problems (missing
    columns, a bad split or label, a missing file, an anomalous row without a mask) are
    collected and raised naming the CSV and the row.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "dataset folder not found")
    csv_path = _under(root, split_csv) if split_csv else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataValidationError(csv_path, "VisA split CSV not found (set split_csv=<file>)")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            raw = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataValidationError(csv_path, f"cannot read the split CSV ({exc})") from exc
    missing = [c for c in VISA_COLUMNS if c not in header]
    if missing:
        raise DataValidationError(csv_path, f"missing column(s) {missing}; a VisA split CSV has {','.join(VISA_COLUMNS)}")
    objects = sorted({r["object"] for r in raw})
    if object is None and len(objects) > 1:
        raise UserError(f"{csv_path}: the CSV holds several objects ({', '.join(objects)}); choose one with object=<name>")
    if object is not None and object not in objects:
        raise UserError(f"{csv_path}: no rows for object {object!r} (objects: {', '.join(objects)})")
    problems: list[tuple[str, str]] = []
    entries: list[ManifestEntry] = []

    def locate(value: str) -> Optional[Path]:
        for base in (csv_path.parent, root):
            if (base / value).exists():
                return base / value
        return None

    for line, r in enumerate(raw, start=2):
        if object is not None and r["object"] != object:
            continue
        where = f"row {line}"
        split, label = r["split"].lower(), r["label"].lower()
        if split not in ("train", "test"):
            problems.append((str(csv_path), f"{where}: split must be train or test, not {r['split']!r}"))
            continue
        if label not in ("normal", "anomaly"):
            problems.append((str(csv_path), f"{where}: label must be normal or anomaly, not {r['label']!r}"))
            continue
        image = locate(r["image"]) if r["image"] else None
        if image is None:
            problems.append((str(csv_path), f"{where}: image {r['image']!r} not found next to the CSV or below {root}"))
            continue
        mask = None
        if label == "anomaly":
            mask = locate(r["mask"]) if r["mask"] else None
            if mask is None:
                problems.append((str(csv_path), f"{where}: anomalous image {r['image']!r} has no mask "
                                                f"({r['mask']!r} not found)"))
                continue
        entries.append(ManifestEntry(
            path=_rel_or_abs(image, root), label=int(label == "anomaly"),
            defect_type="anomaly" if label == "anomaly" else "good",
            mask_path=_rel_or_abs(mask, root) if mask is not None else None, split=split,
        ))
    if not entries and not problems:
        problems.append((str(csv_path), "no rows"))
    if problems:
        raise DatasetInvalid(problems)
    entries.sort(key=lambda e: (e.split != "train", e.label, e.defect_type, e.path))
    return Manifest(root=str(root), entries=entries, has_masks=True)


# --------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------
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


def detect_layout(path: PathLike) -> Optional[str]:
    """``"manifest"``, ``"mvtec"``, ``"visa"`` (``split_csv/1cls.csv``), ``"labelme"`` (a
    LabelMe .json below the folder) or ``None`` when the layout cannot be recognised."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        return "manifest"
    if (p / "train" / "good").is_dir():
        return "mvtec"
    if (p / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if p.is_dir() and _looks_like_labelme(p):
        return "labelme"
    return None


def _coerce(layout: str, kw: dict) -> dict:
    """Check option names; turn option strings from settings files into their types."""
    accepted = LAYOUT_OPTIONS.get(layout, ())
    unknown = sorted(k for k in kw if k not in accepted)
    if unknown:
        raise UserError(f"the {layout} layout takes {', '.join(accepted) or 'no options'}; got {unknown}")
    out = {}
    for k, v in kw.items():
        try:
            if k == "test_fraction":
                v = float(v)
            elif k == "seed":
                v = int(v)
        except (TypeError, ValueError) as exc:
            raise UserError(f"layout option {k}={v!r} is not a number") from exc
        out[k] = v
    return out


def resolve_layout(path: Optional[PathLike], layout: str = "auto", options: Optional[dict] = None) -> str:
    """The layout ``read_dataset`` reads: ``layout`` itself unless it is ``"auto"``, then
    ``"folder"`` when ``normal_dir`` is among ``options``, else :func:`detect_layout`'s
    answer (DataValidationError when the path is missing or the layout unrecognised)."""
    if layout != "auto":
        return layout
    if "normal_dir" in (options or {}):
        return "folder"
    if path is None or not Path(path).exists():
        raise DataValidationError(path, "dataset path not found")
    found = detect_layout(path)
    if found is None:
        raise DataValidationError(path, "cannot recognise the dataset layout; " + ACCEPTED_LAYOUTS_HELP)
    return found


def read_dataset(path: Optional[PathLike], layout: str = "auto", **kw) -> Manifest:
    """Read a dataset in any accepted layout.

    ``layout``: ``"auto"`` (MVTec when ``path/train/good/`` exists, a manifest when
    ``path`` is a ``.json`` file, VisA when ``path/split_csv/1cls.csv`` exists, LabelMe
    when LabelMe .json files lie below ``path``, the folder layout when ``normal_dir`` is
    passed), ``"mvtec"``, ``"folder"`` (``path`` is the normal folder unless ``normal_dir``
    is given; other keywords go to :func:`read_folder`), ``"labelme"``, ``"coco"``,
    ``"visa"`` or ``"manifest"``. Options per layout: :data:`LAYOUT_OPTIONS`; relative path
    options of the annotation layouts are relative to ``path``.
    """
    layout = resolve_layout(path, layout, kw)
    if layout == "mvtec":
        if kw:
            raise UserError(f"the mvtec layout takes no options, got {sorted(kw)}")
        return read_mvtec(path)
    if layout == "folder":
        kw = _coerce(layout, kw)
        normal_dir = kw.pop("normal_dir", None) or path
        if normal_dir is None:
            raise UserError("the folder layout needs normal_dir")
        return read_folder(normal_dir, **kw)
    if layout == "manifest":
        return Manifest.load(path)
    readers = {"labelme": read_labelme, "coco": read_coco, "visa": read_visa}
    if layout in readers:
        if path is None:
            raise UserError(f"the {layout} layout needs the dataset folder")
        return readers[layout](path, **_coerce(layout, kw))
    raise UserError(f"unknown dataset layout {layout!r}; " + ACCEPTED_LAYOUTS_HELP)
