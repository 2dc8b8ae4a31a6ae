"""Annotation layouts (LabelMe, COCO, VisA), masks as annotation references, the
validation catalogue of annotation files, leakage, the dataset report and
``recontrast data check``.

The round-trip tests write LabelMe and COCO annotations from real magnetic-tile-dev
masks (contours traced by tests/annotation_writers.py) and read them back: every mask
must come back with pixel IoU >= 0.95 against the original (measured: 1.0 for all of
them, both formats). They skip where the real data is absent; everything else runs on
small synthetic files.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from recontrast_core.data.annotations import load_source_image, load_source_mask
from recontrast_core.data.cache import ImageCache
from recontrast_core.data.layouts import (
    assign_splits,
    detect_layout,
    hash_fraction,
    read_coco,
    read_dataset,
    read_labelme,
    read_mvtec,
    read_visa,
)
from recontrast_core.data.manifest import AnnotationRef, Manifest, is_reference
from recontrast_core.data.report import check_dataset
from recontrast_core.data.validate import DatasetInvalid, validate_manifest
from recontrast_core.errors import DataValidationError, UserError
from tests.annotation_writers import (
    centre_polygons,
    edge_polygons,
    iou,
    mask_of,
    small_subset,
    write_coco,
    write_labelme,
)

MIN_IOU = 0.95


# ======================================================================================
# helpers: small synthetic LabelMe / COCO files
# ======================================================================================
def _img(path: Path, size=(32, 24), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)).save(path)
    return path


def _lm(path: Path, shapes: list[dict], image_path: str | None, size=(32, 24), **extra) -> Path:
    doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
           "imageWidth": size[0], "imageHeight": size[1], "imageData": None}
    doc.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _poly(label: str, pts, kind: str = "polygon", **extra) -> dict:
    return {"label": label, "points": [list(map(float, p)) for p in pts], "shape_type": kind, "flags": {}, **extra}


def _problems(exc: pytest.ExceptionInfo) -> str:
    return "\n".join(f"{p}: {m}" for p, m in exc.value.problems)


def _labelme_root(tmp_path: Path, n_normal: int = 10) -> Path:
    """images/ + annotations/: n_normal normal images, one with a polygon 'scratch'."""
    root = tmp_path / "lm"
    for i in range(n_normal):
        _img(root / "images" / f"n{i:02d}.png", seed=i)
    _img(root / "images" / "bad.png", seed=99)
    _lm(root / "annotations" / "bad.json", [_poly("scratch", [(2, 2), (10, 2), (10, 8), (2, 8)])], "../images/bad.png")
    return root


# ======================================================================================
# LabelMe
# ======================================================================================
def test_labelme_reads_images_annotations_and_rasterises_at_image_size(tmp_path):
    root = _labelme_root(tmp_path)
    m = read_labelme(root)
    bad = [e for e in m.entries if e.label == 1]
    assert len(bad) == 1 and bad[0].defect_type == "scratch" and bad[0].split == "test"
    assert bad[0].mask_path == "annotation:annotations/bad.json#labelme:0:32x24"
    assert m.has_masks and all(e.mask_path is None for e in m.entries if e.label == 0)
    mask = load_source_mask(m.source(bad[0].mask_path))
    want = np.zeros((24, 32), bool)
    want[2:9, 2:11] = True  # pixel-centre points, outline included (LabelMe's own rule)
    np.testing.assert_array_equal(mask, want)
    report = validate_manifest(m)
    assert report.n_masks == 1 and report.counts["test"]["1"] == 1
    assert detect_layout(root) == "labelme" and read_dataset(root).entries == m.entries


def test_labelme_rectangle_circle_mask_and_several_labels(tmp_path):
    root = tmp_path / "lm"
    _img(root / "a.png")
    part = np.zeros((3, 4), np.uint8)
    part[1, :] = 255
    buf = io.BytesIO()
    Image.fromarray(part).save(buf, format="PNG")
    shapes = [
        _poly("dent", [(20, 10), (16, 4)], "rectangle"),  # corners in any order
        _poly("spot", [(5, 18), (7, 18)], "circle"),
        _poly("ok", [(0, 0), (3, 3)], "rectangle"),
        _poly("smear", [(25, 1), (28, 3)], "mask", mask=base64.b64encode(buf.getvalue()).decode()),
    ]
    _lm(root / "a.json", shapes, "a.png")
    m = read_labelme(root, normal_label="ok")
    (e,) = m.entries
    assert e.label == 1 and e.defect_type == "dent"  # the first defect label in file order
    assert e.mask_path.endswith("#labelme:0,1,3:32x24")  # the "ok" shape is not part of the mask
    mask = load_source_mask(m.source(e.mask_path))
    assert mask[4:11, 16:21].all() and not mask[0:4, 0:4].any()
    assert mask[18, 5] and mask[16, 5] and mask[18, 3] and not mask[18, 8]  # radius 2 circle
    assert mask[2, 25:29].all() and not mask[1, 25:29].any() and not mask[3, 25:29].any()  # mask row 1 at y=1+1


def test_labelme_normal_label_only_shapes_and_no_shapes_are_normal(tmp_path):
    root = tmp_path / "lm"
    for name in ("a", "b", "c"):
        _img(root / f"{name}.png")
    _lm(root / "a.json", [_poly("ok", [(0, 0), (3, 3)], "rectangle")], "a.png")
    _lm(root / "b.json", [], "b.png")
    m = read_labelme(root, normal_label="ok", test_fraction=0.0)
    assert [e.label for e in m.entries] == [0, 0, 0] and {e.split for e in m.entries} == {"train"}
    # without normal_label the "ok" shape is a defect
    assert read_labelme(root, test_fraction=0.0).select(label=1).entries[0].defect_type == "ok"


def test_labelme_matches_by_stem_and_reads_embedded_images(tmp_path):
    root = tmp_path / "lm"
    _img(root / "pics" / "x.png", seed=1)
    _img(root / "pics" / "n.png", seed=2)
    # imagePath names no file (the images moved); the stem finds pics/x.png
    _lm(root / "labels" / "x.json", [_poly("d", [(1, 1), (5, 1), (5, 5)])], "somewhere/x.png")
    embedded = _img(tmp_path / "elsewhere.png", seed=3)
    _lm(root / "labels" / "only_in_json.json", [_poly("d", [(1, 1), (5, 1), (5, 5)])], "only_in_json.png",
        imageData=base64.b64encode(embedded.read_bytes()).decode())
    m = read_labelme(root)
    by_type = {e.path: e for e in m.entries}
    assert by_type["pics/x.png"].label == 1
    ref = "annotation:labels/only_in_json.json#labelme:imageData"
    assert ref in by_type and by_type[ref].label == 1 and is_reference(ref)
    np.testing.assert_array_equal(load_source_image(m.source(ref)), np.repeat(
        np.asarray(Image.open(embedded))[..., None], 3, axis=2))
    report = validate_manifest(m)
    assert report.n_entries == 3
    loaded = ImageCache(16).load(m, with_masks=True)
    assert loaded.images.shape == (3, 3, 16, 16) and loaded.masks.sum() > 0


def test_split_rule_hash_folders_and_test_fraction(tmp_path):
    root = tmp_path / "lm"
    names = [f"img{i:03d}.png" for i in range(60)]
    for i, n in enumerate(names):
        _img(root / n, seed=i)
    m = read_labelme(root)  # no annotation at all: a normal-only dataset
    test = {Path(e.path).name for e in m.entries if e.split == "test"}
    assert test == {n for n in names if hash_fraction(n, 0) < 0.2}
    assert 0 < len(test) < 30
    m3 = read_labelme(root, test_fraction=0.5, seed=1)
    assert {Path(e.path).name for e in m3.entries if e.split == "test"} == {n for n in names if hash_fraction(n, 1) < 0.5}
    # adding an image moves no other one
    _img(root / "zzz.png", seed=100)
    again = {Path(e.path).name for e in read_labelme(root).entries if e.split == "test"}
    assert again - {"zzz.png"} == test
    # train/ and test/ folders decide (split="auto"); split="hash" ignores them
    assert assign_splits([("a/train/x.png", "x.png", "a/train/x.png"), ("test/y.png", "y.png", "test/y.png")],
                         test_fraction=0.99) == {"a/train/x.png": "train", "test/y.png": "test"}
    assert assign_splits([("train/x.png", "x.png", "train/x.png")], 0.0, split="hash") == {"train/x.png": "train"}
    # never an empty training set
    only = assign_splits([("a.png", "a.png", "a.png"), ("b.png", "b.png", "b.png")], test_fraction=0.999999)
    assert sorted(only.values()) == ["test", "train"]
    with pytest.raises(UserError, match="test_fraction"):
        read_labelme(root, test_fraction=1.0)
    with pytest.raises(UserError, match="split must be"):
        read_labelme(root, split="random")


# ---- the validation catalogue: each problem names its file ------------------------------
def test_polygon_with_two_points_names_the_file(tmp_path):
    root = _labelme_root(tmp_path, 2)
    bad = _lm(root / "annotations" / "bad.json", [_poly("scratch", [(2, 2), (10, 2)])], "../images/bad.png")
    with pytest.raises(DatasetInvalid) as exc:
        read_labelme(root)
    assert exc.value.path == str(bad) and "polygon with 2 points (a polygon needs at least 3)" in str(exc.value)


def test_unknown_shape_type_names_the_file(tmp_path):
    root = _labelme_root(tmp_path, 2)
    bad = _lm(root / "annotations" / "bad.json", [_poly("scratch", [(2, 2), (10, 2), (4, 4)], "blob")],
              "../images/bad.png")
    with pytest.raises(DatasetInvalid, match="unknown shape type 'blob'") as exc:
        read_labelme(root)
    assert exc.value.path == str(bad)
    _lm(bad, [_poly("scratch", [(2, 2), (10, 2)], "line")], "../images/bad.png")
    with pytest.raises(DatasetInvalid, match="'line' encloses no region"):
        read_labelme(root)


def test_invalid_json_names_the_file(tmp_path):
    root = _labelme_root(tmp_path, 2)
    broken = root / "annotations" / "broken.json"
    broken.write_text('{"shapes": [')
    with pytest.raises(DatasetInvalid, match="invalid JSON") as exc:
        read_labelme(root)
    assert exc.value.path == str(broken)


def test_image_path_outside_the_dataset_is_refused(tmp_path):
    root = _labelme_root(tmp_path, 2)
    _img(tmp_path / "outside.png")
    bad = _lm(root / "annotations" / "bad.json", [_poly("s", [(2, 2), (10, 2), (4, 4)])], "../../outside.png")
    with pytest.raises(DatasetInvalid, match="points outside the dataset folder") as exc:
        read_labelme(root)
    assert exc.value.path == str(bad)


def test_annotation_without_its_image_names_the_file(tmp_path):
    root = _labelme_root(tmp_path, 2)
    (root / "images" / "bad.png").unlink()
    with pytest.raises(DatasetInvalid, match="image not found.*no imageData") as exc:
        read_labelme(root)
    assert exc.value.path == str(root / "annotations" / "bad.json")


def test_stated_size_differs_from_the_image_names_the_file(tmp_path):
    root = _labelme_root(tmp_path, 2)
    bad = _lm(root / "annotations" / "bad.json", [_poly("s", [(2, 2), (10, 2), (4, 4)])], "../images/bad.png",
              size=(64, 48))
    with pytest.raises(DatasetInvalid, match=r"stated image size 64x48 .* differs from the image's 32x24") as exc:
        read_labelme(root)
    assert exc.value.path == str(bad)


def test_two_annotations_for_one_image_and_ambiguous_stems(tmp_path):
    root = _labelme_root(tmp_path, 2)
    _lm(root / "annotations" / "again.json", [], "../images/bad.png")
    with pytest.raises(DatasetInvalid, match="annotates the same image"):
        read_labelme(root)
    root2 = tmp_path / "amb"
    _img(root2 / "a" / "x.png")
    _img(root2 / "b" / "x.png", seed=5)
    _lm(root2 / "x.json", [], None)
    with pytest.raises(DatasetInvalid, match="several images have the stem 'x'"):
        read_labelme(root2)


def test_points_outside_the_image_are_clipped_with_a_warning(tmp_path):
    root = _labelme_root(tmp_path, 4)
    bad = _lm(root / "annotations" / "bad.json", [_poly("s", [(-5, 2), (40, 2), (40, 30), (2, 8)])],
              "../images/bad.png")
    m = read_labelme(root)
    report = validate_manifest(m)
    (warning,) = [w for w in report.warnings if "clipped" in w]
    assert str(bad) in warning and "3 annotation point(s) outside" in warning
    mask = load_source_mask(m.source(m.select(label=1).entries[0].mask_path))
    assert mask.shape == (24, 32) and mask[2:, :].any()


def test_fingerprint_and_cache_follow_the_annotation_file(tmp_path):
    root = _labelme_root(tmp_path, 4)
    m = read_labelme(root).with_hashes()
    cdir = tmp_path / "cache"
    first = ImageCache(16, cache_dir=cdir).load(m, with_masks=True)
    _lm(root / "annotations" / "bad.json", [_poly("scratch", [(2, 2), (30, 2), (30, 20), (2, 20)])],
        "../images/bad.png")
    m2 = read_labelme(root).with_hashes()
    assert m2.fingerprint != m.fingerprint  # the JSON file is hashed with its image
    second = ImageCache(16, cache_dir=cdir).load(m2, with_masks=True)
    assert second.masks.sum() > first.masks.sum()  # not served from the stale cache


# ======================================================================================
# Leakage: the same image content in train and test
# ======================================================================================
def test_duplicate_content_across_splits_is_an_error_unless_allowed(tmp_path):
    root = tmp_path / "lm"
    for i in range(6):
        _img(root / "train" / f"t{i}.png", seed=i)
    _img(root / "test" / "copy_of_t0.png", seed=0)  # same bytes as train/t0.png
    m = read_labelme(root)
    with pytest.raises(DatasetInvalid, match="same image content .* train/t0.png") as exc:
        validate_manifest(m)
    assert exc.value.path == str(root / "test" / "copy_of_t0.png")
    assert "allow_duplicates" in str(exc.value)
    report = validate_manifest(m, allow_duplicates=True)
    assert any("(allowed)" in w for w in report.warnings)
    assert report.duplicates == [{"sha256": report.duplicates[0]["sha256"],
                                  "paths": ["train/t0.png", "test/copy_of_t0.png"], "splits": ["test", "train"]}]


# ======================================================================================
# COCO
# ======================================================================================
def _coco(root: Path, anns: list[dict], images=None, categories=None) -> Path:
    images = images if images is not None else [
        {"id": i + 1, "file_name": f"img{i}.png", "width": 32, "height": 24} for i in range(6)]
    for im in images:
        if not (root / "imgs" / im["file_name"]).exists():
            _img(root / "imgs" / im["file_name"], seed=im["id"])
    doc = {"images": images, "annotations": anns,
           "categories": categories if categories is not None else [{"id": 1, "name": "crack"}, {"id": 2, "name": "ok"}]}
    path = root / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_polygons_rle_and_boxes(tmp_path):
    from pycocotools import mask as mask_utils

    root = tmp_path / "coco"
    rle_mask = np.zeros((24, 32), np.uint8)
    rle_mask[10:12, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]},
        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": {"size": [24, 32], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 3, "category_id": 1, "bbox": [4, 5, 3, 2]},
        {"id": 4, "image_id": 4, "category_id": 2, "bbox": [0, 0, 2, 2]},  # an "ok" box
    ]
    _coco(root, anns)
    m = read_coco(root, annotations="instances.json", images="imgs", normal_label="ok", test_fraction=0.0)
    rows = {e.path: e for e in m.entries}
    assert [rows[f"imgs/img{i}.png"].label for i in range(6)] == [1, 1, 1, 0, 0, 0]
    assert rows["imgs/img0.png"].mask_path == "annotation:instances.json#coco:1:32x24"
    masks = [load_source_mask(m.source(rows[f"imgs/img{i}.png"].mask_path)) for i in range(3)]
    want = np.zeros((24, 32), bool)
    want[2:8, 2:10] = True  # pixel-edge coordinates
    np.testing.assert_array_equal(masks[0], want)
    np.testing.assert_array_equal(masks[1], rle_mask.astype(bool))
    box = np.zeros((24, 32), bool)
    box[5:7, 4:7] = True
    np.testing.assert_array_equal(masks[2], box)
    assert validate_manifest(m).n_masks == 3
    assert read_dataset(root, layout="coco", annotations="instances.json", images="imgs",
                        test_fraction="0.0", normal_label="ok").entries == m.entries


def test_coco_unknown_image_and_category_name_the_file(tmp_path):
    root = tmp_path / "coco"
    path = _coco(root, [{"id": 7, "image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(DatasetInvalid, match="annotation 7 refers to unknown image id 99") as exc:
        read_coco(root, annotations="instances.json", images="imgs")
    assert exc.value.path == str(path)
    _coco(root, [{"id": 8, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(DatasetInvalid, match="annotation 8 refers to unknown category id 5"):
        read_coco(root, annotations="instances.json", images="imgs")
    _coco(root, [{"id": 9, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5]]}])
    with pytest.raises(DatasetInvalid, match="polygon 0 has 2 point"):
        read_coco(root, annotations="instances.json", images="imgs")


def test_coco_missing_image_wrong_size_outside_and_bad_json(tmp_path):
    root = tmp_path / "coco"
    path = _coco(root, [])
    (root / "imgs" / "img2.png").unlink()
    with pytest.raises(DatasetInvalid, match="image not found") as exc:
        read_coco(root, annotations="instances.json", images="imgs")
    assert exc.value.path == str(root / "imgs" / "img2.png") and str(path) in str(exc.value)
    _img(root / "imgs" / "img2.png", size=(40, 24))
    with pytest.raises(DatasetInvalid, match=r"stated image size 32x24 .* differs from the image's 40x24"):
        read_coco(root, annotations="instances.json", images="imgs")
    _coco(root, [], images=[{"id": 1, "file_name": "../../x.png", "width": 32, "height": 24}])
    with pytest.raises(DatasetInvalid, match="points outside the image folder"):
        read_coco(root, annotations="instances.json", images="imgs")
    path.write_text("{not json")
    with pytest.raises(DataValidationError, match="invalid JSON") as exc:
        read_coco(root, annotations="instances.json", images="imgs")
    assert exc.value.path == str(path)


# ======================================================================================
# VisA
# ======================================================================================
def test_visa_split_csv(tmp_path):
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(5):
        _img(root / "candle" / "Data" / "Images" / "Normal" / f"{i:03d}.JPG", seed=i)
        rows.append(f"candle,{'train' if i < 4 else 'test'},normal,candle/Data/Images/Normal/{i:03d}.JPG,")
    _img(root / "candle" / "Data" / "Images" / "Anomaly" / "100.JPG", seed=9)
    m = np.zeros((24, 32), np.uint8)
    m[3:6, 3:6] = 1  # VisA masks are small label maps
    Image.fromarray(m).save(root / "candle" / "Data" / "Images" / "Anomaly" / "100_mask.png")
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/100.JPG,candle/Data/Images/Anomaly/100_mask.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert detect_layout(root) == "visa"
    manifest = read_dataset(root)
    assert [(e.split, e.label) for e in manifest.entries] == [("train", 0)] * 4 + [("test", 0), ("test", 1)]
    report = validate_manifest(manifest)
    assert report.n_masks == 1 and load_source_mask(manifest.source(manifest.entries[-1].mask_path)).sum() == 9
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows + ["candle,test,broken,x.JPG,"]) + "\n")
    with pytest.raises(DatasetInvalid, match="row 8: label must be normal or anomaly") as exc:
        read_visa(root)
    assert exc.value.path == str(root / "split_csv" / "1cls.csv")
    with pytest.raises(UserError, match="takes split_csv, object"):
        read_dataset(root, layout="visa", normal_label="ok")


# ======================================================================================
# Real masks through both formats: IoU >= 0.95
# ======================================================================================
def test_tracers_on_a_synthetic_shape():
    m = np.zeros((20, 20), bool)
    m[3:9, 4:15] = True
    m[8:16, 10:12] = True  # an L shape
    m[17, 17] = True  # a single pixel
    assert len(centre_polygons(m)) == 2 and len(edge_polygons(m)) == 2


def test_labelme_and_coco_written_from_real_masks_read_back_with_iou(magnetic_tile_root, tmp_path):
    sub = small_subset(magnetic_tile_root, tmp_path / "mvtec")
    mv = read_mvtec(sub)
    lm = read_labelme(write_labelme(sub, tmp_path / "labelme", embed=("exp1_num_108719.jpg",)))
    coco_poly = read_coco(write_coco(sub, tmp_path / "coco"), annotations="annotations.json", images="images")
    coco_rle = read_coco(write_coco(sub, tmp_path / "coco_rle", rle_every=1), annotations="annotations.json",
                         images="images")
    originals = {Path(e.path).name: e for e in mv.entries}
    for name, m in (("labelme", lm), ("coco polygons", coco_poly), ("coco rle", coco_rle)):
        validate_manifest(m)
        ious = []
        for e in m.entries:
            key = Path(e.path).name if not is_reference(e.path) else "exp1_num_108719.jpg"
            o = originals[key]
            assert (e.split, e.label, e.defect_type) == (o.split, o.label, o.defect_type), (name, e, o)
            if e.label:
                ious.append(iou(load_source_mask(m.source(e.mask_path)), mask_of(mv.abspath(o.mask_path))))
        assert len(ious) == 6 and min(ious) >= MIN_IOU, (name, ious)


# ======================================================================================
# The report and `recontrast data check`
# ======================================================================================
def test_check_dataset_report(tmp_path):
    root = _labelme_root(tmp_path, 10)
    report, manifest = check_dataset(root)
    assert report["ok"] and report["layout"] == "labelme" and report["anomalous"] == 1
    assert report["masks"]["count"] == 1
    assert report["masks"]["mean_coverage"] == pytest.approx(7 * 9 / (32 * 24))
    assert report["image_sizes"] == {"32x24": 11} and report["image_modes"] == {"L": 11}
    assert sum(s["normal"] for s in report["splits"].values()) == 10
    _lm(root / "annotations" / "bad.json", [_poly("s", [(1, 1), (2, 2)])], "../images/bad.png")
    bad, none = check_dataset(root)
    assert not bad["ok"] and none is None and "polygon with 2 points" in bad["problems"][0]["problem"]


def test_data_check_cli(tmp_path):
    from recontrast_core.cli import app

    runner = CliRunner()
    root = _labelme_root(tmp_path, 10)
    res = runner.invoke(app, ["data", "check", str(root), "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["splits"]["test"]["defect_types"]["scratch"] == 1
    # normal_label and the generic --layout-option
    res = runner.invoke(app, ["data", "check", str(root), "--layout", "labelme", "--normal-label", "scratch",
                              "--layout-option", "test_fraction=0.5", "--json", "--no-progress"])
    assert res.exit_code == 0 and json.loads(res.stdout)["anomalous"] == 0
    # data that cannot be trained on: exit 2, the file named
    bad = _lm(root / "annotations" / "bad.json", [_poly("s", [(1, 1), (2, 2)], "blob")], "../images/bad.png")
    res = runner.invoke(app, ["data", "check", str(root), "--no-progress"])
    assert res.exit_code == 2 and str(bad) in res.output.replace("\n", "") and "unknown shape type" in res.output
    # a bad option is one line, exit 2
    res = runner.invoke(app, ["data", "check", str(root), "--layout", "mvtec", "--no-progress"])
    assert res.exit_code == 2


def test_ingest_writes_the_dataset_card(tmp_path):
    from recontrast_core import steps
    from recontrast_core.steps.settings import apply_overrides

    root = _labelme_root(tmp_path, 10)
    settings = apply_overrides(None, {"data.source": str(tmp_path), "data.layout": "labelme",
                                      "data.layout_options": {"normal_label": "ok", "test_fraction": 0.3}})
    settings = apply_overrides(settings, {"data.source": str(root)})
    mpath = steps.ingest(tmp_path / "ingest", settings)
    card = json.loads((tmp_path / "ingest" / "dataset_card.json").read_text())
    manifest = Manifest.load(mpath)
    assert card["ok"] and card["fingerprint"] == manifest.fingerprint and card["layout"] == "labelme"
    assert card["masks"]["count"] == 1 and manifest.entries[-1].mask_path.startswith("annotation:")
    # path-valued options are relative to the dataset root
    coco = tmp_path / "coco"
    _coco(coco, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}])
    settings = apply_overrides(None, {"data.source": str(coco), "data.layout": "coco",
                                      "data.layout_options": {"annotations": "instances.json", "images": "imgs"}})
    steps.ingest(tmp_path / "ingest_coco", settings)
    card = json.loads((tmp_path / "ingest_coco" / "dataset_card.json").read_text())
    assert card["anomalous"] == 1 and card["n_images"] == 6


def test_annotation_ref_str_names_file_and_selector(tmp_path):
    ref = AnnotationRef(tmp_path / "a.json", "labelme:0:3x2")
    assert str(ref) == f"{tmp_path / 'a.json'}#labelme:0:3x2"
    m = Manifest(root=str(tmp_path))
    assert m.abspath("annotation:sub/a.json#labelme:0:3x2") == tmp_path / "sub" / "a.json"
    assert m.source("annotation:sub/a.json#labelme:0:3x2") == AnnotationRef(tmp_path / "sub" / "a.json",
                                                                            "labelme:0:3x2")
    assert m.source("x.png") == tmp_path / "x.png"


def test_ingest_logs_the_dataset_card_to_the_step_run(tmp_path, monkeypatch):
    """When tracking, ingest uploads dataset_card.json under ``ingest/`` (MLflow stubbed)."""
    import contextlib
    import importlib

    from recontrast_core import steps
    from recontrast_core.mlops import tracking as mlflow_tracking

    ingest_mod = importlib.import_module("recontrast_core.steps.ingest")
    from recontrast_core.steps.settings import apply_overrides

    uploads = []

    @contextlib.contextmanager
    def fake_tracking(step, pipeline_run_id, tracking, params=None, **kw):
        yield "run-1"

    monkeypatch.setattr(ingest_mod, "step_tracking", fake_tracking)
    monkeypatch.setattr(ingest_mod, "log_artifacts", lambda run_id, local, path, tracking: uploads.append(
        (run_id, Path(local).name, path, json.loads(Path(local).read_text()))))
    for name in ("start_pipeline_run", "log_dataset_input", "log_metrics"):
        monkeypatch.setattr(mlflow_tracking, name, lambda *a, **k: None)
    root = _labelme_root(tmp_path, 6)
    steps.ingest(tmp_path / "out", apply_overrides(None, {"data.source": str(root)}), pipeline_run_id="p-1")
    cards = [u for u in uploads if u[1] == "dataset_card.json"]
    assert len(cards) == 1 and cards[0][0] == "run-1" and cards[0][2] == "ingest"
    assert cards[0][3]["ok"] and cards[0][3]["layout"] == "labelme"


def test_cli_layout_options_resolve_paths_against_the_current_folder(tmp_path, monkeypatch):
    from recontrast_core.cli.common import layout_options

    monkeypatch.chdir(tmp_path)
    opts = layout_options("coco", annotations=Path("a.json"), images=Path("imgs"), normal_label="ok",
                          abnormal_dir=Path("ignored"), items=["test_fraction=0.3", "split=hash"])
    assert opts == {"annotations": str(tmp_path / "a.json"), "images": str(tmp_path / "imgs"),
                    "normal_label": "ok", "test_fraction": "0.3", "split": "hash"}
    assert layout_options("folder", abnormal_dir=Path("bad"))["abnormal_dir"] == Path("bad")
    with pytest.raises(UserError, match="KEY=VALUE"):
        layout_options("labelme", items=["oops"])
