"""Data layer: decoding, layouts, validation, the resize cache, the manifest."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from recontrast_core.data import cache as cache_mod
from recontrast_core.data.cache import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageCache,
    batch_slices,
    load_resized,
    normalize,
)
from recontrast_core.data.images import IMAGE_EXTENSIONS, image_size, load_image_rgb, load_mask
from recontrast_core.data.layouts import (
    LAYOUT_OPTIONS,
    LAYOUTS,
    PATH_OPTIONS,
    Layout,
    folder_reader,
    get_layout,
    hash_fraction,
    read_dataset,
    read_folder,
    read_mvtec,
    register_layout,
)
from recontrast_core.data.manifest import Manifest, ManifestEntry, split_validation
from recontrast_core.data.validate import DatasetInvalid, ValidationReport, validate_manifest
from recontrast_core.errors import DataValidationError, UserError

MAGNETIC_TILE_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/magnetic-tile-dev"


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _problem_for(exc: DatasetInvalid, name: str) -> str:
    hits = [msg for p, msg in exc.problems if Path(p).name == name]
    assert hits, f"no problem reported for {name}: {exc.problems}"
    return hits[0]


# ======================================================================================
# images.py: conversions
# ======================================================================================
def test_image_extensions():
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def test_gray_becomes_three_equal_channels(tmp_path, write_image):
    p = write_image(tmp_path / "g.png", (7, 5), value=128)
    a = load_image_rgb(p)
    assert a.dtype == np.uint8 and a.shape == (5, 7, 3)
    assert (a == 128).all()


def test_gray_and_rgb_of_same_content_agree(tmp_path, write_image):
    g = np.random.default_rng(1).integers(0, 256, (9, 11), dtype=np.uint8)
    pg = write_image(tmp_path / "g.png", array=g)
    prgb = write_image(tmp_path / "c.png", array=np.stack([g, g, g], axis=2))
    pbmp = write_image(tmp_path / "g.bmp", array=g)
    ptif = write_image(tmp_path / "g.tif", array=g)
    ref = load_image_rgb(pg)
    for p in (prgb, pbmp, ptif):
        np.testing.assert_array_equal(load_image_rgb(p), ref)


def test_bilevel_image(tmp_path):
    p = tmp_path / "b.png"
    img = Image.new("1", (4, 3), 0)
    img.putpixel((1, 1), 1)
    img.save(p)
    a = load_image_rgb(p)
    assert a.shape == (3, 4, 3) and a[1, 1].tolist() == [255, 255, 255] and a[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("value,expected", [(65535, 255), (0, 0), (100 * 256 + 255, 100), (255, 0)])
def test_16bit_png_scaled_by_bit_depth(tmp_path, value, expected):
    p = tmp_path / "d.png"
    Image.fromarray(np.full((6, 8), value, dtype=np.uint16)).save(p)
    a = load_image_rgb(p)
    assert a.dtype == np.uint8 and a.shape == (6, 8, 3)
    assert (a == expected).all()


def test_16bit_not_min_max_stretched(tmp_path):
    # A dim 16-bit image stays dim: no per-image stretching.
    p = tmp_path / "dim.png"
    arr = np.array([[0, 1000], [2000, 4096]], dtype=np.uint16)
    Image.fromarray(arr).save(p)
    assert load_image_rgb(p)[..., 0].tolist() == [[0, 3], [7, 16]]


def test_16bit_big_endian_tiff(tmp_path):
    p = tmp_path / "be.tif"
    img = Image.frombytes("I;16B", (3, 2), np.full((2, 3), 51400, dtype=">u2").tobytes())
    img.save(p)
    assert (load_image_rgb(p) == 51400 >> 8).all()


def test_int32_image_holding_16bit_data(tmp_path):
    p = tmp_path / "i.tif"
    Image.fromarray(np.full((3, 3), 65535, dtype=np.int32)).save(p)
    with Image.open(p) as img:
        assert img.mode == "I"
    assert (load_image_rgb(p) == 255).all()


def test_float_image(tmp_path):
    p01 = tmp_path / "f01.tif"
    Image.fromarray(np.array([[0.0, 0.5], [1.0, -0.2]], dtype=np.float32)).save(p01)
    assert load_image_rgb(p01)[..., 0].tolist() == [[0, 128], [255, 0]]
    p255 = tmp_path / "f255.tif"
    Image.fromarray(np.array([[0.0, 100.0], [300.0, 2.0]], dtype=np.float32)).save(p255)
    assert load_image_rgb(p255)[..., 0].tolist() == [[0, 100], [255, 2]]


def test_rgba_composited_on_black(tmp_path):
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[0, 0] = (200, 100, 50, 255)  # opaque: unchanged
    a[0, 1] = (200, 100, 50, 0)  # transparent: black
    a[0, 2] = (200, 100, 50, 128)  # half: about half
    p = tmp_path / "a.png"
    Image.fromarray(a).save(p)
    out = load_image_rgb(p)
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [100, 50, 25]


def test_la_composited_on_black(tmp_path):
    a = np.array([[[100, 255], [100, 0]]], dtype=np.uint8)
    p = tmp_path / "la.png"
    Image.frombytes("LA", (2, 1), a.tobytes()).save(p)
    out = load_image_rgb(p)
    assert out[0, 0].tolist() == [100, 100, 100] and out[0, 1].tolist() == [0, 0, 0]


def test_palette_image(tmp_path):
    img = Image.new("P", (3, 2), 0)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    img.putpixel((2, 1), 1)
    p = tmp_path / "p.png"
    img.save(p)
    out = load_image_rgb(p)
    assert out[1, 2].tolist() == [10, 20, 30] and out[0, 0].tolist() == [0, 0, 0]


def test_palette_with_transparency_composited(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([255, 255, 255, 10, 20, 30] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    p = tmp_path / "pt.png"
    img.save(p, transparency=0)
    out = load_image_rgb(p)
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [10, 20, 30]


def test_cmyk_image(tmp_path):
    p = tmp_path / "c.tif"
    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(p)
    out = load_image_rgb(p)
    assert out.shape == (2, 2, 3) and (out == 255).all()


def test_jpeg_gray(tmp_path, write_image):
    p = write_image(tmp_path / "g.jpg", (16, 16), value=90)
    out = load_image_rgb(p)
    assert out.shape == (16, 16, 3) and (out[..., 0] == out[..., 1]).all()
    assert abs(int(out.mean()) - 90) <= 2


def test_image_size_is_header_only(tmp_path, write_image):
    p = write_image(tmp_path / "s.png", (40, 30))
    assert image_size(p) == (40, 30)


# ---- masks ---------------------------------------------------------------------------
def test_mask_0_255(tmp_path, write_mask):
    m = load_mask(write_mask(tmp_path / "m.png", (10, 8), box=(2, 1, 5, 4)))
    assert m.dtype == np.bool_ and m.shape == (8, 10)
    assert m.sum() == 9 and m[1:4, 2:5].all()


def test_mask_0_1_and_label_map(tmp_path, write_image):
    a = np.zeros((4, 4), dtype=np.uint8)
    a[0, 0] = 1
    a[1, 1] = 3
    m = load_mask(write_image(tmp_path / "m01.png", array=a))
    assert m.sum() == 2 and m[0, 0] and m[1, 1]


def test_mask_jpeg_noise_is_ignored(tmp_path, write_image):
    a = np.zeros((16, 16), dtype=np.uint8)
    a[4:12, 4:12] = 255
    a[0, 0] = 7  # compression-like noise
    a[4, 4] = 240
    m = load_mask(write_image(tmp_path / "n.png", array=a))
    assert not m[0, 0] and m[4, 4] and m.sum() == 64


def test_mask_16bit_and_colour(tmp_path):
    p16 = tmp_path / "m16.png"
    a = np.zeros((3, 3), dtype=np.uint16)
    a[1, 1] = 65535
    Image.fromarray(a).save(p16)
    assert load_mask(p16).sum() == 1 and load_mask(p16)[1, 1]
    prgb = tmp_path / "red.png"
    c = np.zeros((3, 3, 3), dtype=np.uint8)
    c[2, 2] = (255, 0, 0)
    Image.fromarray(c).save(prgb)
    m = load_mask(prgb)
    assert m.sum() == 1 and m[2, 2]


# ---- broken files --------------------------------------------------------------------
def test_truncation_flag_stays_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_image_raises_naming_file(tmp_path, write_image, ext):
    p = _truncate(write_image(tmp_path / f"cut{ext}", (64, 64)))
    with pytest.raises(DataValidationError) as ei:
        load_image_rgb(p)
    assert ei.value.path == str(p) and str(p) in str(ei.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_not_an_image_raises(tmp_path):
    p = tmp_path / "fake.png"
    p.write_text("hello")
    with pytest.raises(DataValidationError, match="fake.png: not a readable image"):
        load_image_rgb(p)
    with pytest.raises(DataValidationError, match="file not found"):
        load_image_rgb(tmp_path / "missing.png")


# ======================================================================================
# layouts/
# ======================================================================================
def test_read_mvtec_tiny(tiny_mvtec):
    m = read_mvtec(tiny_mvtec)
    assert m.root == str(tiny_mvtec) and m.has_masks
    assert [e.path for e in m.entries[:2]] == ["train/good/000.png", "train/good/001.png"]
    assert len(m.select("train")) == 6 and len(m.select("test", 0)) == 2
    bad = m.select("test", 1).entries
    assert [e.defect_type for e in bad] == ["crack", "crack"]
    assert [e.mask_path for e in bad] == ["ground_truth/crack/000_mask.png", "ground_truth/crack/001_mask.png"]
    assert all(e.mask_path is None for e in m.entries if e.label == 0)
    assert all(not Path(e.path).is_absolute() for e in m.entries)
    assert read_mvtec(tiny_mvtec).entries == m.entries  # deterministic


def test_read_mvtec_accepts_plain_stem_mask(tiny_mvtec):
    os.rename(tiny_mvtec / "ground_truth/crack/001_mask.png", tiny_mvtec / "ground_truth/crack/001.png")
    m = read_mvtec(tiny_mvtec)
    assert m.select("test", 1).entries[1].mask_path == "ground_truth/crack/001.png"


def test_read_mvtec_without_ground_truth(build_mvtec, tmp_path):
    root = build_mvtec(tmp_path / "nogt", masks=False)
    m = read_mvtec(root)
    assert not m.has_masks and all(e.mask_path is None for e in m.entries)
    validate_manifest(m)  # no masks required then


def test_read_mvtec_structural_errors(tiny_mvtec, tmp_path):
    (tiny_mvtec / "test" / "stray.png").write_bytes(b"x")
    with pytest.raises(DataValidationError, match="stray.png: unexpected file in test/"):
        read_mvtec(tiny_mvtec)
    with pytest.raises(DataValidationError, match="no train/good/"):
        read_mvtec(tmp_path)


def test_read_mvtec_real_magnetic_tile(magnetic_tile_root):
    m = read_mvtec(magnetic_tile_root)
    assert m.has_masks
    assert len(m.select("train", 0)) == 341 and len(m.select("train", 1)) == 0
    test = m.select("test")
    counts = {}
    for e in test.entries:
        counts[e.defect_type] = counts.get(e.defect_type, 0) + 1
    assert counts == {"good": 107, "blowhole": 115, "break": 85, "crack": 57}
    bad = m.select("test", 1).entries
    assert bad and all(e.mask_path for e in bad)
    assert all(m.abspath(e.mask_path).is_file() for e in bad)
    report = validate_manifest(m)  # full decode of every image and mask: about 1 s
    assert report.counts["train"] == {"0": 341, "1": 0}
    assert report.defect_counts == {"blowhole": 115, "break": 85, "crack": 57, "good": 107}
    assert report.n_masks == 257 and report.warnings == []
    data = load_resized(m.subset(bad[:4]), 64, with_masks=True)
    assert data.images.shape == (4, 3, 64, 64) and data.masks.any(dim=(1, 2)).all()
    assert (data.images[:, 0] == data.images[:, 1]).all()  # grayscale source


def _tree(tmp_path, write_image, write_mask, n_normal=20):
    base = tmp_path / "plain"
    for i in range(n_normal):
        write_image(base / "ok" / f"n{i:02d}.png", seed=i)
    write_image(base / "ng" / "flat1.png", seed=100)
    write_image(base / "ng" / "scratch" / "s1.png", seed=101)
    write_image(base / "ng" / "dent" / "d1.jpg", seed=102)
    write_mask(base / "masks" / "flat1_mask.png")
    write_mask(base / "masks" / "scratch" / "s1.png")
    write_mask(base / "masks" / "d1.png")
    return base


def test_read_folder(tmp_path, write_image, write_mask):
    base = _tree(tmp_path, write_image, write_mask)
    m = read_folder(base / "ok", base / "ng", base / "masks", test_fraction=0.3, seed=0)
    assert m.root == str(base) and m.has_masks
    normals = [e for e in m.entries if e.label == 0]
    assert len(normals) == 20
    n_test = sum(e.split == "test" for e in normals)
    assert 0 < n_test < 20
    for e in normals:
        expect = "test" if hash_fraction(Path(e.path).name, 0) < 0.3 else "train"
        assert e.split == expect and e.path.startswith("ok/")
    bad = {Path(e.path).name: e for e in m.entries if e.label == 1}
    assert {k: (v.defect_type, v.split) for k, v in bad.items()} == {
        "flat1.png": ("anomaly", "test"), "s1.png": ("scratch", "test"), "d1.jpg": ("dent", "test")}
    assert bad["flat1.png"].mask_path == "masks/flat1_mask.png"
    assert bad["s1.png"].mask_path == "masks/scratch/s1.png"
    assert bad["d1.jpg"].mask_path == "masks/d1.png"
    validate_manifest(m)
    # Same call, same manifest; a different seed gives a different split.
    assert read_folder(base / "ok", base / "ng", base / "masks", test_fraction=0.3).entries == m.entries
    other = read_folder(base / "ok", test_fraction=0.3, seed=1)
    assert {e.path: e.split for e in other.entries} != {e.path: e.split for e in normals}


def test_read_folder_adding_files_does_not_reshuffle(tmp_path, write_image, write_mask):
    base = _tree(tmp_path, write_image, write_mask)
    before = {e.path: e.split for e in read_folder(base / "ok", test_fraction=0.3).entries}
    for i in range(20, 30):
        write_image(base / "ok" / f"n{i:02d}.png", seed=i)
    after = {e.path: e.split for e in read_folder(base / "ok", test_fraction=0.3).entries}
    assert all(after[p] == s for p, s in before.items())
    assert len(after) == 30


def test_read_folder_keeps_one_training_image(tmp_path, write_image):
    write_image(tmp_path / "ok" / "only.png")
    m = read_folder(tmp_path / "ok", test_fraction=0.999999)
    assert [e.split for e in m.entries] == ["train"]


def test_read_folder_absolute_paths_without_common_parent(tmp_path, write_image):
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("needs a second top-level writable folder (/dev/shm)")
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        write_image(tmp_path / "ok" / "a.png")
        write_image(other / "b.png")
        m = read_folder(tmp_path / "ok", other, test_fraction=0.0)
        assert all(Path(e.path).is_absolute() for e in m.entries)
        assert all(m.abspath(e.path).is_file() for e in m.entries)
    finally:
        shutil.rmtree(other)


def test_read_dataset_dispatch(tiny_mvtec, tmp_path, write_image):
    assert read_dataset(tiny_mvtec).entries == read_mvtec(tiny_mvtec).entries
    saved = read_mvtec(tiny_mvtec).save(tmp_path / "m" / "manifest.json")
    assert read_dataset(saved).entries == read_mvtec(tiny_mvtec).entries
    write_image(tmp_path / "flat" / "a.png")
    with pytest.raises(DataValidationError, match="accepted layouts: 'mvtec'.*'folder'.*manifest"):
        read_dataset(tmp_path / "flat")
    m = read_dataset(None, normal_dir=tmp_path / "flat", test_fraction=0.0)
    assert [e.path for e in m.entries] == ["a.png"]
    assert read_dataset(tmp_path / "flat", layout="folder", test_fraction=0.0).entries == m.entries
    with pytest.raises(UserError, match="unknown dataset layout"):
        read_dataset(tiny_mvtec, layout="yolo")
    with pytest.raises(DataValidationError, match="not found"):
        read_dataset(tmp_path / "nope")


def test_layout_registry_reads_a_registered_layout(tiny_mvtec, tmp_path, write_image):
    """A layout is one register_layout call: read_dataset reads it by name (options checked,
    path options listed) and auto-detects it by its detect test; unknown names list it."""
    def read_toy(root, seed: int = 0):
        return Manifest(root=str(root), entries=[
            ManifestEntry(path=p.name, label=0, defect_type="good", split="train")
            for p in sorted(Path(root).iterdir()) if p.suffix == ".png"], has_masks=False)

    write_image(tmp_path / "toy" / "a.png")
    (tmp_path / "toy" / "TOY").write_text("marker")
    toy = Layout("toy", "a TOY file next to the images", folder_reader("toy", read_toy), options=("seed", "listing"),
                 path_options=("listing",), detect=lambda p: (p / "TOY").is_file())
    assert "toy" not in LAYOUTS
    with pytest.raises(DataValidationError, match="cannot recognise"):
        read_dataset(tmp_path / "toy")
    register_layout(toy)
    try:
        assert get_layout("toy") is toy and LAYOUT_OPTIONS["toy"] == ("seed", "listing")
        assert PATH_OPTIONS[-1] == "listing"
        m = read_dataset(tmp_path / "toy", layout="toy", seed="3")
        assert [e.path for e in m.entries] == ["a.png"]
        assert read_dataset(tmp_path / "toy").entries == m.entries  # auto-detected, after the built-ins
        assert read_dataset(tiny_mvtec).entries == read_mvtec(tiny_mvtec).entries
        with pytest.raises(UserError, match=r"the toy layout takes seed, listing; got \['split'\]"):
            read_dataset(tmp_path / "toy", layout="toy", split="hash")
        with pytest.raises(ValueError, match="registered twice"):
            register_layout(toy)
        with pytest.raises(UserError, match="unknown dataset layout 'yolo'; accepted layouts: ") as err:
            read_dataset(tmp_path / "toy", layout="yolo")
        listed = str(err.value)
        for name in LAYOUTS:
            assert f"'{name}' (" in listed or name == "manifest"
        assert "'toy' (a TOY file next to the images)" in listed and "a manifest.json file" in listed
    finally:
        del LAYOUTS["toy"]
    assert "toy" not in LAYOUT_OPTIONS and "listing" not in PATH_OPTIONS
    with pytest.raises(UserError, match="unknown dataset layout 'toy'") as err:
        read_dataset(tmp_path / "toy", layout="toy")
    assert "'toy'" not in str(err.value).split(";", 1)[1]


# ======================================================================================
# validate.py
# ======================================================================================
def test_validate_ok_report(tiny_mvtec):
    seen = []
    r = validate_manifest(read_mvtec(tiny_mvtec), progress=lambda d, t: seen.append((d, t)))
    assert isinstance(r, ValidationReport)
    assert r.counts == {"train": {"0": 6, "1": 0}, "test": {"0": 2, "1": 2}}
    assert r.defect_counts == {"crack": 2, "good": 2}
    assert r.n_masks == 2 and r.warnings == [] and r.min_size == (32, 24)
    assert seen[-1] == (10, 10)
    assert "train: 6 normal" in r.summary()
    assert r.to_dict()["counts"]["test"]["1"] == 2


def test_validate_text_file_in_train(tiny_mvtec):
    (tiny_mvtec / "train/good/notes.txt").write_text("hi")
    (tiny_mvtec / "train/good/Thumbs.db").write_bytes(b"\0\1")
    (tiny_mvtec / "train/good/.DS_Store").write_bytes(b"\0")  # hidden: skipped
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(read_mvtec(tiny_mvtec))
    exc = ei.value
    assert len(exc.problems) == 2
    assert "not an image file (extension '.txt'" in _problem_for(exc, "notes.txt")
    assert "not an image file" in _problem_for(exc, "Thumbs.db")
    assert str(exc).startswith(str(tiny_mvtec / "train/good/Thumbs.db"))
    assert str(exc).endswith("(and 1 more problem)")
    assert isinstance(exc, DataValidationError) and isinstance(exc, UserError)


def test_validate_non_image_with_image_extension(tiny_mvtec):
    (tiny_mvtec / "train/good/zzz.jpg").write_text("definitely not a jpeg")
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(read_mvtec(tiny_mvtec), check_decode=False)
    assert "not a readable image" in _problem_for(ei.value, "zzz.jpg")


def test_validate_directory_in_image_folder(tiny_mvtec):
    (tiny_mvtec / "train/good/sub").mkdir()
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(read_mvtec(tiny_mvtec))
    assert "is a directory" in _problem_for(ei.value, "sub")


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_validate_truncated(tiny_mvtec, write_image, ext):
    p = _truncate(write_image(tiny_mvtec / f"test/crack/cut{ext}", (32, 24), seed=9))
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tiny_mvtec / "ground_truth/crack/cut_mask.png")
    m = read_mvtec(tiny_mvtec)
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(m)
    assert "truncated" in _problem_for(ei.value, p.name)
    assert len(ei.value.problems) == 1
    validate_manifest(m, check_decode=False)  # header-only checks cannot see truncation


def test_validate_defect_without_mask(tiny_mvtec):
    os.remove(tiny_mvtec / "ground_truth/crack/001_mask.png")
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(read_mvtec(tiny_mvtec))
    msg = _problem_for(ei.value, "001.png")
    assert "no mask" in msg and "ground_truth/crack/001_mask.png" in msg
    assert ei.value.path == str(tiny_mvtec / "test/crack/001.png")


def test_validate_mask_wrong_size(tiny_mvtec, write_mask):
    write_mask(tiny_mvtec / "ground_truth/crack/000_mask.png", (30, 24))
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(read_mvtec(tiny_mvtec), check_decode=False)
    msg = _problem_for(ei.value, "000_mask.png")
    assert "mask size 30x24 differs from image size 32x24" in msg


def test_validate_mask_missing_on_disk(tiny_mvtec):
    m = read_mvtec(tiny_mvtec)
    os.remove(tiny_mvtec / "ground_truth/crack/000_mask.png")
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(m)
    assert "mask file not found" in _problem_for(ei.value, "000_mask.png")


def test_validate_empty_train(build_mvtec, tmp_path):
    root = build_mvtec(tmp_path / "empty", n_train=0)
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(read_mvtec(root))
    assert ei.value.path == str(root)
    assert "empty training set" in str(ei.value)


def test_validate_collects_all_problems(tiny_mvtec, write_mask):
    (tiny_mvtec / "train/good/a.txt").write_text("x")
    _truncate(tiny_mvtec / "train/good/003.png")
    os.remove(tiny_mvtec / "ground_truth/crack/001_mask.png")
    write_mask(tiny_mvtec / "ground_truth/crack/000_mask.png", (8, 8))
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(read_mvtec(tiny_mvtec))
    exc = ei.value
    assert len(exc.problems) == 4
    assert "(and 3 more problems)" in str(exc)
    assert exc.path == exc.problems[0][0]
    assert len(exc.details().splitlines()) == 4


def test_validate_bad_rows_and_duplicates(tiny_mvtec):
    m = read_mvtec(tiny_mvtec)
    first = m.entries[0]
    m2 = m.subset(m.entries + [first, replace(m.entries[1], label=2), replace(m.entries[2], split="val")])
    with pytest.raises(DatasetInvalid) as ei:
        validate_manifest(m2, check_decode=False)
    text = ei.value.details()
    assert "listed 2 times" in text and "label must be 0" in text and "split must be one of" in text


def test_validate_one_class_test_is_a_warning(build_mvtec, tmp_path):
    root = build_mvtec(tmp_path / "oneclass", defects={})
    r = validate_manifest(read_mvtec(root))
    assert any("only normal images" in w for w in r.warnings)
    shutil.rmtree(root / "test")
    r = validate_manifest(read_mvtec(root))
    assert any("no test images" in w for w in r.warnings)


# ======================================================================================
# cache.py
# ======================================================================================
def test_load_resized_shapes(tiny_mvtec):
    m = read_mvtec(tiny_mvtec)
    d = load_resized(m, 16, with_masks=True)
    assert d.images.shape == (10, 3, 16, 16) and d.images.dtype == torch.uint8
    assert d.masks.shape == (10, 16, 16) and d.masks.dtype == torch.bool
    # train/good, then test/<defect> sorted by name: crack before good
    assert d.labels.tolist() == [0] * 6 + [1] * 2 + [0] * 2 and d.labels.dtype == torch.int64
    assert not d.masks[:6].any() and d.masks[6:8].any(dim=(1, 2)).all() and not d.masks[8:].any()
    images, masks, labels = load_resized(m, 16, with_masks=False)
    assert masks is None and images.shape == (10, 3, 16, 16)


def test_resize_is_square_bilinear_and_masks_nearest(tmp_path, write_image, write_mask):
    write_image(tmp_path / "g.png", (40, 20), value=77)
    p = write_image(tmp_path / "r.png", (40, 20), mode="RGB", seed=5)
    write_mask(tmp_path / "m.png", (40, 20), box=(0, 0, 20, 20))
    m = Manifest(root=str(tmp_path), has_masks=True, entries=[
        ManifestEntry("g.png", 1, "x", "m.png", "test"), ManifestEntry("r.png", 0, split="test")])
    d = load_resized(m, 10, with_masks=True)
    assert (d.images[0] == 77).all()
    assert d.masks[0, :, :5].all() and not d.masks[0, :, 5:].any() and not d.masks[1].any()
    with Image.open(p) as img:
        ref = np.asarray(img.convert("RGB").resize((10, 10), Image.BILINEAR))
    np.testing.assert_array_equal(d.images[1].permute(1, 2, 0).numpy(), ref)


def test_cache_decodes_each_file_once(tiny_mvtec, monkeypatch):
    calls: dict[str, int] = {}
    real_img, real_mask = cache_mod.load_image_rgb, cache_mod.load_mask

    def counting(real):
        def f(path):
            calls[str(path)] = calls.get(str(path), 0) + 1
            return real(path)
        return f

    monkeypatch.setattr(cache_mod, "load_image_rgb", counting(real_img))
    monkeypatch.setattr(cache_mod, "load_mask", counting(real_mask))
    m = read_mvtec(tiny_mvtec)
    cache = ImageCache(16)
    doubled = m.subset(m.entries + m.entries[:3])  # a file listed twice
    a = load_resized(doubled, 16, with_masks=True, cache=cache)
    b = cache.load(m.select("test"), with_masks=True)
    c = load_resized(m, 16, with_masks=True, cache=cache, progress=True)
    assert len(calls) == 12 and set(calls.values()) == {1}  # 10 images + 2 masks
    assert cache.decoded == 12
    assert torch.equal(a.images[:10], c.images) and torch.equal(b.images, c.images[6:])
    assert torch.equal(a.images[10:], a.images[:3])
    with pytest.raises(ValueError):
        load_resized(m, 32, cache=cache)


def test_disk_cache(tiny_mvtec, tmp_path, monkeypatch):
    m = read_mvtec(tiny_mvtec)
    cdir = tmp_path / "cache"
    first = ImageCache(16, cache_dir=cdir)
    d1 = first.load(m, with_masks=True)
    assert first.decoded == 12 and len(list(cdir.rglob("*.npy"))) == 12
    second = ImageCache(16, cache_dir=cdir)
    d2 = second.load(m, with_masks=True)
    assert second.decoded == 0
    assert torch.equal(d1.images, d2.images) and torch.equal(d1.masks, d2.masks)
    # Another size is another key; a changed file is decoded again.
    assert ImageCache(8, cache_dir=cdir).load(m).images.shape[-1] == 8
    p = tiny_mvtec / "train/good/000.png"
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(p)
    os.utime(p, ns=(1, 1))
    third = ImageCache(16, cache_dir=cdir)
    d3 = third.load(m)
    assert third.decoded == 1 and (d3.images[0] == 0).all()
    # Content-hashed manifests key by hash; a corrupt cache file is recomputed.
    hm = m.with_hashes()
    h1 = ImageCache(16, cache_dir=cdir)
    h1.load(hm)
    for f in cdir.rglob("*.npy"):
        f.write_bytes(b"garbage")
    h2 = ImageCache(16, cache_dir=cdir)
    assert torch.equal(h2.load(hm).images, d3.images) and h2.decoded == 10


def test_normalize():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2).contiguous()
    y = normalize(x, "cpu")
    assert y.dtype == torch.float32 and y.shape == x.shape
    for c in range(3):
        assert y[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-5)
        assert y[0, c, 0, 1].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-5)
    assert normalize(x[0]).shape == (3, 1, 2)
    with pytest.raises(TypeError):
        normalize(x.float(), "cpu")


def test_batch_slices():
    assert [(s.start, s.stop) for s in batch_slices(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    assert list(batch_slices(0, 3)) == []


# ======================================================================================
# manifest.py
# ======================================================================================
def test_manifest_round_trip_and_fingerprint(tiny_mvtec, tmp_path):
    m = read_mvtec(tiny_mvtec).with_hashes()
    assert m.fingerprint and all(e.sha256 for e in m.entries)
    path = m.save(tmp_path / "out" / "manifest.json")
    back = Manifest.load(path)
    assert back == m
    shuffled = m.subset(list(reversed(m.entries)))
    assert shuffled.compute_fingerprint() == m.fingerprint
    # Moving the dataset does not change the fingerprint; changing a pixel does.
    moved = shutil.copytree(tiny_mvtec, tmp_path / "moved")
    assert read_mvtec(moved).with_hashes().fingerprint == m.fingerprint
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(moved / "train/good/000.png")
    assert read_mvtec(moved).with_hashes().fingerprint != m.fingerprint


def test_manifest_load_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{}")
    with pytest.raises(UserError, match="not a recontrast manifest"):
        Manifest.load(p)


def test_split_validation_deterministic(tiny_mvtec):
    train = read_mvtec(tiny_mvtec).select("train")
    fit1, val1 = split_validation(train, 0.34, seed=3)
    fit2, val2 = split_validation(train.subset(reversed(train.entries)), 0.34, seed=3)
    assert [e.path for e in val1.entries] == [e.path for e in val2.entries]
    assert len(val1) == 2 and len(fit1) == 4
    assert {e.path for e in fit1.entries} | {e.path for e in val1.entries} == {e.path for e in train.entries}
    assert not ({e.path for e in fit1.entries} & {e.path for e in val1.entries})
    fit0, val0 = split_validation(train, 0.0)
    assert len(val0) == 0 and len(fit0) == 6
