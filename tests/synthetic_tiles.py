"""A synthetic stand-in for ``magnetic-tile-dev``: an MVTec-layout tree of textured grayscale
"tiles" with drawn defects and their masks, written in about a second (real PNG files).

Layout (the real dataset's, same defect names and mask naming)::

    root/train/good/*.png                     normal tiles (24)
    root/test/good/*.png                      normal tiles (8)
    root/test/<defect>/*.png                  blowhole (8), break (5), crack (6)
    root/ground_truth/<defect>/<stem>_mask.png   0/255 masks, same size as their image

Every tile is a smooth random texture plus faint horizontal stripes and fine grain (seeded,
so the tree is byte-identical on every run and every machine). Sizes vary a little between
images (like the real photographs), a mask always matches its image. Defects are clearly
visible, so trained and training-free detectors score them above chance:

* ``blowhole``: a dark round pit (filled ellipse with a bright rim);
* ``crack``: a dark, thin, jagged line across part of the tile;
* ``break``: a dark chipped-off region at one edge of the tile.

Counts are what the tests draw: 24 training normals cover the largest subsets (the
few-shot pipeline takes 24, the normal-only tests 16-20), every test folder holds at least
5 images (batch scoring spreads 20 over the test folders), the ``tiny_tile`` subset takes
12 + 4 + 3 blowholes + 3 cracks. File names are unique over the whole tree, as in the real
dataset.

Use :func:`build_synthetic_tiles` (or ``python -m tests.synthetic_tiles OUT``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_COUNTS: dict[str, int] = {
    "train/good": 24,
    "test/good": 8,
    "test/blowhole": 8,
    "test/break": 5,
    "test/crack": 6,
}
DEFECTS = ("blowhole", "break", "crack")
SIZES = ((160, 192), (176, 208), (144, 176), (192, 224))  # (width, height), cycled with jitter


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A float32 gray tile: smooth low-frequency shading + stripes + grain, mean ~120."""
    coarse = Image.fromarray((rng.random((h // 16 + 2, w // 16 + 2)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(6)), np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    period = rng.uniform(9.0, 13.0)
    stripes = 8.0 * np.sin(2 * np.pi * y / period + rng.uniform(0, 2 * np.pi))
    grain = rng.normal(0.0, 4.0, (h, w)).astype(np.float32)
    return 120.0 + 0.25 * (smooth - smooth.mean()) + stripes + grain


def _blowhole(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, Image.Image]:
    """(darkening amount as an 'L' image, mask) of a round pit."""
    r = rng.uniform(0.08, 0.14) * min(w, h)
    cx, cy = rng.uniform(r + 8, w - r - 8), rng.uniform(r + 8, h - r - 8)
    rx, ry = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return mask, mask


def _crack(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, Image.Image]:
    """A jagged polyline over 40-70% of the tile, 3-4 px wide."""
    n = 9
    length = rng.uniform(0.4, 0.7) * max(w, h)
    angle = rng.uniform(0, np.pi)
    x, y = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h)
    pts = []
    for _ in range(n):
        pts.append((float(np.clip(x, 4, w - 5)), float(np.clip(y, 4, h - 5))))
        a = angle + rng.normal(0, 0.5)
        x, y = x + np.cos(a) * length / n, y + np.sin(a) * length / n
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).line(pts, fill=255, width=int(rng.integers(3, 5)), joint="curve")
    return mask, mask


def _break(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, Image.Image]:
    """A chipped-off piece at one edge: a jagged polygon touching the border."""
    side = int(rng.integers(4))
    depth = rng.uniform(0.12, 0.2) * min(w, h)
    span = rng.uniform(0.25, 0.4)
    start = rng.uniform(0.1, 0.9 - span)
    k = 7
    t = np.linspace(start, start + span, k)
    d = depth * np.sin(np.linspace(0, np.pi, k)) * rng.uniform(0.7, 1.0, k)
    if side in (0, 1):  # top / bottom
        edge = 0.0 if side == 0 else h - 1.0
        sign = 1.0 if side == 0 else -1.0
        pts = [(float(tt * w), float(edge + sign * dd)) for tt, dd in zip(t, d)]
    else:  # left / right
        edge = 0.0 if side == 2 else w - 1.0
        sign = 1.0 if side == 2 else -1.0
        pts = [(float(edge + sign * dd), float(tt * h)) for tt, dd in zip(t, d)]
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    return mask, mask


_DRAW = {"blowhole": _blowhole, "crack": _crack, "break": _break}


def _defective(rng: np.random.Generator, tile: np.ndarray, defect: str) -> tuple[np.ndarray, np.ndarray]:
    h, w = tile.shape
    shape, mask = _DRAW[defect](rng, w, h)
    m = np.asarray(mask) > 127
    if not m.any():  # never an empty mask (the drawing sizes make this unreachable)
        m[h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2] = True
    soft = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(1.0)),
                      np.float32) / 255.0
    out = tile * (1 - soft) + (tile - tile.mean() + 35.0) * soft  # dark, keeps a little texture
    if defect == "blowhole":  # a bright rim around the pit
        ring = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5)), bool) & ~m
        out[ring] += 45.0
    return out, m


def build_synthetic_tiles(root: Path | str, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write the tree under ``root`` (created; existing files of the same names are
    overwritten) and return ``root``. Deterministic for a given ``counts`` and ``seed``."""
    root = Path(root)
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    rng = np.random.default_rng(seed)
    index = 0
    for rel, n in counts.items():
        split, label = rel.split("/")
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            index += 1
            bw, bh = SIZES[index % len(SIZES)]
            w, h = bw + int(rng.integers(-4, 5)) * 2, bh + int(rng.integers(-4, 5)) * 2
            tile = _texture(rng, w, h)
            stem = f"syn_{index:04d}"
            if label != "good":
                tile, m = _defective(rng, tile, label)
                gt = root / "ground_truth" / label
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(m.astype(np.uint8) * 255, "L").save(gt / f"{stem}_mask.png")
            Image.fromarray(np.clip(tile, 0, 255).round().astype(np.uint8), "L").save(folder / f"{stem}.png")
    return root


if __name__ == "__main__":  # python -m tests.synthetic_tiles OUT
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.synthetic_tiles OUT")
    print(build_synthetic_tiles(sys.argv[1]))
