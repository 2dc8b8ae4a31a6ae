"""The review loop's core (recontrast_core.review): which rows are reviewed, polygons traced
from an anomaly map, the LabelMe files (the fields LabelMe's own loader requires, and
LabelMe's loader itself where it is installed), reading the reviewer's verdicts, the import
into MVTec and LabelMe datasets (the result passes the dataset checks), the card's diff;
and the fleet's product-line names (config.line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recontrast_core.config import PipelineConfig, line_names
from recontrast_core.data.annotations import LabelmeShape, rasterise_labelme
from recontrast_core.errors import UserError
from recontrast_core.review import (
    FLAG_REVIEWED,
    FLAG_SKIP,
    REVIEW_FILE,
    card_diff,
    export_review,
    import_into_dataset,
    labelme_document,
    labelme_shape,
    map_regions,
    read_review,
    select_for_review,
    trace_outer_boundary,
    trace_regions,
)
from tests.conftest import build_tiny_mvtec, write_image


# ---------------------------------------------------------------------------------------
# which rows
# ---------------------------------------------------------------------------------------
def _row(path, norm, decision, error=""):
    return {"path": path, "score": None if norm is None else norm * 2, "normalized_score": norm, "decision": decision,
            "error": error}


def test_flagged_and_borderline_rows_are_selected_most_doubtful_first():
    rows = [_row("a", 0.10, False), _row("b", 0.45, False), _row("c", 0.55, True), _row("d", 0.95, True),
            _row("e", 0.59, True), _row("f", None, None, "unreadable"), _row("g", 0.399, False)]
    picked = select_for_review(rows, (0.4, 0.6))
    assert [r["path"] for r in picked] == ["b", "c", "e", "d"]
    assert [r["reason"] for r in picked] == ["borderline", "flagged", "flagged", "flagged"]
    assert [r["path"] for r in select_for_review(rows, (0.4, 0.6), flagged=False)] == ["b", "c", "e"]
    assert [r["path"] for r in select_for_review(rows, (0.4, 0.6), limit=2)] == ["b", "c"]
    for band in [(0.6, 0.7), (0.5, 0.5), (0.3,)]:
        with pytest.raises(UserError, match="--band"):
            select_for_review(rows, band)


# ---------------------------------------------------------------------------------------
# polygons
# ---------------------------------------------------------------------------------------
def test_the_boundary_tracer_walks_the_outline_once():
    m = np.zeros((6, 7), bool)
    m[1:4, 2:5] = True
    pts = trace_outer_boundary(m)
    assert len(pts) == len(set(pts)) == 8  # the 3x3 block's ring, each pixel once
    assert pts[0] == (2, 1) and set(pts) == {(x, y) for y in range(1, 4) for x in range(2, 5)} - {(3, 2)}
    one = np.zeros((3, 3), bool)
    one[1, 1] = True
    assert trace_outer_boundary(one) == [(1, 1)]


@pytest.mark.parametrize("seed", range(12))
def test_traced_polygons_rasterise_back_to_the_regions(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(20, 80, 2))
    field = ndimage.gaussian_filter(rng.random((h, w)), 3)
    mask = field > np.quantile(field, 0.8)
    polygons = trace_regions(mask, min_area=1, eps=0.0)
    shapes = [LabelmeShape(i, "a", "polygon", [tuple(p) for p in poly]) for i, poly in enumerate(polygons)]
    drawn, outside = rasterise_labelme(shapes, (w, h))
    assert outside == 0
    assert not (mask & ~drawn).any()  # every region pixel inside its polygon
    filled = ndimage.binary_fill_holes(mask)
    assert (drawn & ~filled).sum() <= 0.15 * filled.sum()  # at most the outline's rounding
    # simplified (1 px): far fewer points, nearly the same region
    simple = trace_regions(mask, min_area=1, eps=1.0)
    drawn2, _ = rasterise_labelme([LabelmeShape(i, "a", "polygon", [tuple(p) for p in poly])
                                   for i, poly in enumerate(simple)], (w, h))
    assert sum(map(len, simple)) <= sum(map(len, polygons))
    assert (drawn2 & filled).sum() / (drawn2 | filled).sum() > 0.75


def test_map_regions_cut_the_map_at_the_threshold_at_the_image_size():
    amap = np.zeros((32, 32), np.float32)
    amap[8:16, 20:28] = 5.0  # a block in the model's 32 px map
    polys = map_regions(amap, 2.5, (64, 48))  # the image: 64 wide, 48 high
    assert len(polys) == 1
    xs, ys = np.array(polys[0])[:, 0], np.array(polys[0])[:, 1]
    assert 38 <= xs.min() <= 42 and 54 <= xs.max() <= 58  # 20..28 of 32 -> 40..56 of 64
    assert 10 <= ys.min() <= 14 and 22 <= ys.max() <= 26  # 8..16 of 32 -> 12..24 of 48
    assert map_regions(amap, 6.0, (64, 48)) == []


# ---------------------------------------------------------------------------------------
# LabelMe files
# ---------------------------------------------------------------------------------------
# The keys LabelMe's loader reads (labelme/_label_file.py, 5.x and 6.x): top level
# imagePath, imageData (null: the image beside the file), shapes, flags, imageHeight,
# imageWidth, version; per shape label (str), points (non-empty [[x, y], ...]), shape_type
# (str), flags (str -> bool), description (str), group_id (int or null), mask (base64 or null).
LABELME_TOP = {"version": str, "flags": dict, "shapes": list, "imagePath": str, "imageData": type(None),
               "imageHeight": int, "imageWidth": int}
LABELME_SHAPE = {"label": str, "points": list, "group_id": type(None), "description": str, "shape_type": str,
                 "flags": dict, "mask": type(None)}


def _check_labelme_schema(doc: dict, folder: Path) -> None:
    for key, typ in LABELME_TOP.items():
        assert isinstance(doc[key], typ), key
    assert all(isinstance(k, str) and isinstance(v, bool) for k, v in doc["flags"].items())
    from PIL import Image

    with Image.open(folder / doc["imagePath"]) as img:
        assert img.size == (doc["imageWidth"], doc["imageHeight"])
    for shape in doc["shapes"]:
        for key, typ in LABELME_SHAPE.items():
            assert isinstance(shape[key], typ), key
        assert shape["shape_type"] == "polygon" and len(shape["points"]) >= 3
        assert all(len(p) == 2 and all(isinstance(v, float) for v in p) for p in shape["points"])
        assert all(0 <= x <= doc["imageWidth"] - 1 and 0 <= y <= doc["imageHeight"] - 1 for x, y in shape["points"])


class _FakeDetector:
    """The slice of a Detector export_review uses: a map with a bright block where the image
    is bright, at the model's size."""

    image_size = 32

    class calibration:  # noqa: N801
        threshold = 100.0

    def score_uint8(self, batch):
        x = batch.float().mean(1).numpy()  # [N, S, S] grey levels 0..255
        return x, x.reshape(len(x), -1).max(1)


@pytest.fixture
def exported(tmp_path) -> Path:
    """A review project of three images: two with a bright block (flagged), one dark (borderline)."""
    rows = []
    for i, bright in enumerate((True, True, False)):
        a = np.full((48, 64), 20, np.uint8)
        if bright:
            a[10:30, 8 + 10 * i:30 + 10 * i] = 250
        path = write_image(tmp_path / "incoming" / f"img{i}.png", array=a)
        rows.append(_row(str(path), 0.8 if bright else 0.45, bright))
    items = select_for_review(rows)
    export_review(_FakeDetector(), items, tmp_path / "review", source_table="t.parquet",
                  model={"uri": "models:/m/1", "version": "m/1"}, progress=False)
    return tmp_path / "review"


def test_the_export_is_a_labelme_project(exported):
    meta = json.loads((exported / REVIEW_FILE).read_text())
    assert meta["counts"] == {"flagged": 2, "borderline": 1} and meta["model"]["version"] == "m/1"
    docs = {}
    for item in meta["items"]:
        doc = json.loads((exported / item["annotation"]).read_text())
        _check_labelme_schema(doc, exported)
        assert doc["flags"] == {FLAG_REVIEWED: False, FLAG_SKIP: False}
        assert doc["recontrast"]["reason"] == item["reason"]
        docs[item["reason"], item["source"].rsplit("/", 1)[-1]] = doc
    bright = docs["flagged", "img0.png"]
    assert len(bright["shapes"]) == 1
    xs, ys = np.array(bright["shapes"][0]["points"]).T
    assert 6 <= xs.min() <= 10 and 27 <= xs.max() <= 31 and 8 <= ys.min() <= 12 and 27 <= ys.max() <= 31
    assert docs["borderline", "img2.png"]["shapes"] == []
    # the project is a LabelMe dataset our own reader accepts
    from recontrast_core.data.layouts import read_dataset

    m = read_dataset(exported, layout="labelme")
    assert len(m) == 3 and sum(e.label for e in m.entries) == 2
    with pytest.raises(UserError, match="already holds a review"):
        export_review(_FakeDetector(), [], exported, progress=False)


LABELME_PATH_ENV = "RECONTRAST_LABELME_PATH"


def test_labelme_itself_loads_the_export(exported):
    """LabelMe's own loader (labelme.LabelFile) reads every exported file. LabelMe is not a
    project dependency (it brings PyQt5, ~700 MB): the test runs where ``labelme`` imports,
    or where RECONTRAST_LABELME_PATH names a ``pip install --target`` folder of it (loaded
    headless, QT_QPA_PLATFORM=offscreen); the schema test above always runs."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    extra = os.environ.get(LABELME_PATH_ENV)
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([extra, env.get("PYTHONPATH", "")])
    code = ("import sys, json, pathlib\n"
            "from labelme._label_file import LabelFile\n"
            "n = 0\n"
            "for j in sorted(pathlib.Path(sys.argv[1]).glob('*.json')):\n"
            "    if j.name == 'review.json': continue\n"
            "    lf = LabelFile(str(j)); n += 1\n"
            "    assert lf.image_data and lf.flags == {'reviewed': False, 'skip': False}, j\n"
            "    assert all(s['shape_type'] == 'polygon' and len(s['points']) >= 3 for s in lf.shapes)\n"
            "print(n)\n")
    probe = subprocess.run([sys.executable, "-c", "import labelme._label_file"], env=env, capture_output=True,
                           timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"labelme is not installed (set {LABELME_PATH_ENV} to a `pip install --target` folder of it)")
    res = subprocess.run([sys.executable, "-c", code, str(exported)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "3"


# ---------------------------------------------------------------------------------------
# the reviewer's verdicts and the import
# ---------------------------------------------------------------------------------------
def _review(project: Path, verdicts: dict[str, str]) -> None:
    """Act as the reviewer: ``{source file name: anomaly | normal | skip | (nothing)}``."""
    meta = json.loads((project / REVIEW_FILE).read_text())
    for item in meta["items"]:
        verdict = verdicts.get(item["source"].rsplit("/", 1)[-1])
        if verdict is None:
            continue
        path = project / item["annotation"]
        doc = json.loads(path.read_text())
        doc["flags"] = {FLAG_REVIEWED: True, FLAG_SKIP: verdict == "skip"}
        if verdict == "normal":
            doc["shapes"] = []
        elif verdict == "anomaly" and not doc["shapes"]:
            doc["shapes"] = [labelme_shape([[2.0, 2.0], [20.0, 2.0], [20.0, 20.0]], "scratch")]
        elif verdict == "anomaly":
            for s in doc["shapes"]:
                s["label"] = "blob"
        path.write_text(json.dumps(doc))


def test_the_reviewers_verdicts_are_read(exported):
    _review(exported, {"img0.png": "anomaly", "img1.png": "skip"})
    _, items = read_review(exported)
    by_source = {i.source.rsplit("/", 1)[-1]: i for i in items}
    assert by_source["img0.png"].verdict == "anomaly" and by_source["img0.png"].label == "blob"
    assert by_source["img1.png"].verdict == "skipped" and by_source["img2.png"].verdict == "unreviewed"
    _review(exported, {"img2.png": "normal"})
    assert {i.source.rsplit("/", 1)[-1]: i.verdict for i in read_review(exported)[1]}["img2.png"] == "normal"
    doc = json.loads((exported / items[0].annotation.name).read_text())
    doc["shapes"] = [{"label": "x", "points": [[1, 1], [2, 2]], "shape_type": "polygon"}]
    items[0].annotation.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="fewer than three|at least 3"):
        read_review(exported)


def test_import_into_an_mvtec_dataset_passes_its_checks(exported, tmp_path):
    from recontrast_core.data.layouts import read_dataset
    from recontrast_core.data.report import check_dataset

    root = build_tiny_mvtec(tmp_path / "ds", n_train=6, n_test_good=2, size=(64, 48))
    _review(exported, {"img0.png": "anomaly", "img1.png": "anomaly", "img2.png": "normal"})
    before, manifest = check_dataset(root, "mvtec")
    _, items = read_review(exported)
    result = import_into_dataset(items, root, "mvtec", manifest)
    assert (result["anomalies"], result["normals"]) == (2, 1)
    after, m2 = check_dataset(root, "mvtec")
    assert after["ok"], after["problems"]
    assert after["splits"]["test"]["defect_types"]["blob"] == 2 and after["splits"]["train"]["normal"] == 7
    # the masks are the reviewed polygons, rasterised at the image size
    entry = next(e for e in m2.entries if e.defect_type == "blob")
    from PIL import Image

    mask = np.asarray(Image.open(m2.abspath(entry.mask_path))) > 0
    assert mask.shape == (48, 64) and 0.05 < mask.mean() < 0.3
    diff = card_diff(before, after)
    assert diff["n_images"] == [before["n_images"], before["n_images"] + 3]
    assert diff["splits"]["test"]["defect_types"]["blob"] == [0, 2]
    # again: every image is already there; nothing written
    again = import_into_dataset(read_review(exported)[1], root, "mvtec", read_dataset(root))
    assert again["written"] == [] and len(again["skipped_duplicates"]) == 3


def test_import_into_a_labelme_dataset(exported, tmp_path):
    from recontrast_core.data.report import check_dataset

    root = tmp_path / "lm"
    for i in range(6):
        write_image(root / "images" / f"n{i}.png", (64, 48), seed=50 + i)
    (root / "images" / "n0.json").write_text(json.dumps(labelme_document("n0.png", (64, 48), [])))
    _review(exported, {"img0.png": "anomaly", "img2.png": "normal"})
    before, manifest = check_dataset(root, "labelme")
    result = import_into_dataset(read_review(exported)[1], root, "labelme", manifest)
    assert (result["anomalies"], result["normals"], result["unreviewed"]) == (1, 1, 1)
    after, _ = check_dataset(root, "labelme")
    assert after["ok"], after["problems"]
    assert after["splits"]["test"]["anomalous"] == before["splits"]["test"]["anomalous"] + 1
    assert any(p.startswith("test/review/") and p.endswith(".json") for p in result["written"])


def test_an_import_into_another_layout_is_refused(exported, tmp_path):
    with pytest.raises(UserError, match="mvtec or labelme"):
        import_into_dataset([], tmp_path, "coco", None)


# ---------------------------------------------------------------------------------------
# product lines
# ---------------------------------------------------------------------------------------
def test_a_line_names_its_model_experiments_and_schedule():
    assert line_names(None) == {"model_name": "recontrast", "experiment": "recontrast",
                                "monitor_experiment": "recontrast-monitor", "schedule": "recontrast-retrain"}
    plain = PipelineConfig()
    assert (plain.line, plain.registry.model_name, plain.tracking.experiment) == (None, "recontrast", "recontrast")
    cfg = PipelineConfig(line="tiles-a")
    assert cfg.registry.model_name == cfg.tracking.experiment == "recontrast-tiles-a"
    assert cfg.monitor.experiment == "recontrast-tiles-a-monitor"
    custom = PipelineConfig(line="tiles-a", registry={"model_name": "special"})
    assert custom.registry.model_name == "special"
    # a round trip through params.yaml keeps the names
    from recontrast_core.steps.settings import apply_overrides, dump_settings, load_settings

    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg
    # another line's name left in a settings file is refused, not mixed in
    with pytest.raises(UserError, match="not line 'b'"):
        apply_overrides(cfg, ["line=b"])
    with pytest.raises(UserError, match="line"):
        apply_overrides(None, ["line=Bad_Name"])
    assert dump_settings and load_settings  # the CLI path is covered by the every-field test
