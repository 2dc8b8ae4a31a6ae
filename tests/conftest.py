"""Shared test fixtures.

Data fixtures:

* ``magnetic_tile_root``: the real development dataset (``../shared/data/magnetic-tile-dev``
  relative to the repository, or ``$RECONTRAST_DEV_DATA``); the test is skipped with a
  clear reason where it is absent. Only for tests about the real data itself (its counts,
  its file names, its masks' shapes).
* ``tiles_root`` (session): the dataset the end-to-end and integration paths run on: the
  real one where it is present, else a synthetic tree of the same layout and defect names
  (``tests/synthetic_tiles.py``, real PNGs and masks, built once per session in about a
  second). So CI without ``../shared`` still runs every path. ``tiles_are_synthetic``
  says which one it is (for checks that only hold on the real images).
* ``tiny_tile``: a small MVTec-layout subset of ``tiles_root`` (12 train, 4 good + 3
  blowhole + 3 crack test images with masks) in ``tmp_path``.
* ``tiny_mvtec``: a small synthetic MVTec-layout dataset in ``tmp_path`` (grayscale PNGs,
  one defect type with masks).
* ``write_image``: the helper that writes synthetic images (``write_image(path, ...)``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
MAGNETIC_TILE_DIR = Path(
    os.environ.get("RECONTRAST_DEV_DATA", REPO_ROOT.parent / "shared" / "data" / "magnetic-tile-dev")
)


def write_image(
    path: os.PathLike | str,
    size: tuple[int, int] = (32, 24),
    mode: str = "L",
    value: Optional[int] = None,
    seed: int = 0,
    array: Optional[np.ndarray] = None,
) -> Path:
    """Write a small image (``size`` is width, height). Random pixels unless ``value`` or
    ``array`` is given. The format follows the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is not None:
        img = Image.fromarray(array)
    else:
        w, h = size
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        shape = (h, w) if channels == 1 else (h, w, channels)
        if value is not None:
            data = np.full(shape, value, dtype=np.uint8)
        else:
            data = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
        img = Image.fromarray(data)
    img.save(path)
    return path


def write_mask(path: os.PathLike | str, size: tuple[int, int] = (32, 24), box=(4, 4, 12, 12)) -> Path:
    """A 0/255 mask with a rectangle ``box`` = (x0, y0, x1, y1) of defect."""
    w, h = size
    a = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    return write_image(path, array=a)


def build_tiny_mvtec(
    root: Path,
    n_train: int = 6,
    n_test_good: int = 2,
    defects: dict[str, int] | None = None,
    size: tuple[int, int] = (32, 24),
    masks: bool = True,
) -> Path:
    """Write a small MVTec-layout tree under ``root`` and return ``root``."""
    defects = {"crack": 2} if defects is None else defects
    seed = 0
    for i in range(n_train):
        seed += 1
        write_image(root / "train" / "good" / f"{i:03d}.png", size, seed=seed)
    for i in range(n_test_good):
        seed += 1
        write_image(root / "test" / "good" / f"{i:03d}.png", size, seed=seed)
    for defect, n in defects.items():
        for i in range(n):
            seed += 1
            write_image(root / "test" / defect / f"{i:03d}.png", size, seed=seed)
            if masks:
                write_mask(root / "ground_truth" / defect / f"{i:03d}_mask.png", size)
    return root


def require_dev_tool(exe: os.PathLike | str, what: str) -> str:
    """The path of a command-line tool the dev extra installs (next to the interpreter, else
    on PATH); the test FAILS where it is missing: a missing project tool is a broken test
    environment, not a reason to skip. (Tools the project does not install, e.g. kubectl,
    may still skip.)"""
    import shutil

    exe = Path(exe)
    if exe.is_file():
        return str(exe)
    found = shutil.which(exe.name)
    if found is None:
        pytest.fail(f"{what} is not installed: {exe.name} not found next to {sys.executable} nor on PATH "
                    "(pip install -e '.[dev]')", pytrace=False)
    return found


def real_tiles_present() -> bool:
    return (MAGNETIC_TILE_DIR / "train" / "good").is_dir()


@pytest.fixture
def magnetic_tile_root() -> Path:
    """The real dataset only (skips where it is absent): for tests about its own content."""
    if not real_tiles_present():
        pytest.skip(
            f"real dev dataset not found at {MAGNETIC_TILE_DIR} (expected ../shared/data/"
            "magnetic-tile-dev next to the repository, or set RECONTRAST_DEV_DATA)"
        )
    return MAGNETIC_TILE_DIR


@pytest.fixture(scope="session")
def tiles_are_synthetic() -> bool:
    return not real_tiles_present()


@pytest.fixture(scope="session")
def tiles_root(tiles_are_synthetic: bool, tmp_path_factory) -> Path:
    """magnetic-tile-dev where present, else its synthetic stand-in (never skips).

    Treat it as read-only: it is shared by the whole session (copy what a test changes)."""
    if not tiles_are_synthetic:
        return MAGNETIC_TILE_DIR
    from tests.synthetic_tiles import build_synthetic_tiles

    return build_synthetic_tiles(tmp_path_factory.mktemp("synthetic-tiles") / "magnetic-tile-synthetic")


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """train/good: 6, test/good: 2, test/crack: 2 (with ground_truth masks); 32x24 gray PNGs."""
    return build_tiny_mvtec(tmp_path / "tiny_mvtec")


@pytest.fixture(name="write_image")
def write_image_fixture():
    return write_image


@pytest.fixture(name="write_mask")
def write_mask_fixture():
    return write_mask


@pytest.fixture
def build_mvtec():
    """``build_mvtec(root, n_train=6, n_test_good=2, defects={"crack": 2}, size=(32, 24), masks=True)``."""
    return build_tiny_mvtec


# Model hubs are unreachable offline: fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_tile(tiles_root: Path, tmp_path: Path) -> Path:
    """A small MVTec-layout subset of ``tiles_root`` (12 train, 4 good + 6 defective test)."""
    import shutil

    dst = tmp_path / "tiny_tile"

    def copy(rel: Path) -> None:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiles_root / rel, dst / rel)

    for f in sorted((tiles_root / "train/good").iterdir())[:12]:
        copy(f.relative_to(tiles_root))
    for f in sorted((tiles_root / "test/good").iterdir())[:4]:
        copy(f.relative_to(tiles_root))
    for defect in ("blowhole", "crack"):
        for f in sorted((tiles_root / "test" / defect).iterdir())[:3]:
            copy(f.relative_to(tiles_root))
            copy(Path("ground_truth") / defect / f"{f.stem}_mask.png")
    return dst
