"""Synthetic anomalies for COFT-AD negatives: cut-paste patch, scar, noise blob.

Every function takes one image ``[3,H,W]`` (``uint8`` or float in [0, 1], any device) and
a CPU ``torch.Generator`` and returns ``(image, region)``: a new image of the same dtype
and a ``bool [H,W]`` mask of the pixels it may have changed. Pixels outside ``region``
are bit-identical to the input; the region is never empty. Gray images (three equal
channels) stay gray. Sizes are fractions of the image side, so the same settings work
at 64 and 256 px.

* :func:`cut_paste` (Li et al., CutPaste 2021): a rectangle (2-15 % of the area, aspect
  0.3-3.3) copied from elsewhere in the image, brightness/contrast jittered by up to
  +-20 %, pasted at a random place.
* :func:`scar`: a thin rotated rectangle (CutPaste-scar-like: width 1-6 %, length 8-30 %
  of the side, any angle) filled with a random intensity.
* :func:`noise_blob`: a rotated ellipse (radii 3-12 % of the side) blended 50-100 % with
  uniform noise.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def _u(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def _is_gray(img: torch.Tensor) -> bool:
    return bool(torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]))


def _check(img: torch.Tensor) -> None:
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected one [3,H,W] image, got {tuple(img.shape)}")


def _to01(img: torch.Tensor) -> torch.Tensor:
    return img.float() / 255.0 if img.dtype == torch.uint8 else img.float()


def _compose(img: torch.Tensor, new01: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``img`` with ``new01`` (float [0,1]) written inside ``region`` only."""
    new01 = new01.clamp(0.0, 1.0)
    if img.dtype == torch.uint8:
        new = (new01 * 255.0).round().to(torch.uint8)
    else:
        new = new01.to(img.dtype)
    return torch.where(region.unsqueeze(0), new, img)


def _ensure_nonempty(region: torch.Tensor, cy: float, cx: float) -> torch.Tensor:
    if not bool(region.any()):
        h, w = region.shape
        region[min(h - 1, max(0, int(cy))), min(w - 1, max(0, int(cx)))] = True
    return region


def cut_paste(img: torch.Tensor, gen: torch.Generator, area: tuple[float, float] = (0.02, 0.15),
              aspect: tuple[float, float] = (0.3, 3.3)) -> tuple[torch.Tensor, torch.Tensor]:
    _check(img)
    _, h, w = img.shape
    a = _u(gen, *area) * h * w
    r = math.exp(_u(gen, math.log(aspect[0]), math.log(aspect[1])))
    ph = max(1, min(h - 1, int(round(math.sqrt(a * r)))))
    pw = max(1, min(w - 1, int(round(math.sqrt(a / r)))))
    sy, sx = _randint(gen, 0, h - ph), _randint(gen, 0, w - pw)
    dy, dx = _randint(gen, 0, h - ph), _randint(gen, 0, w - pw)
    x01 = _to01(img)
    patch = x01[:, sy:sy + ph, sx:sx + pw]
    mean = patch.mean()
    patch = (patch - mean) * _u(gen, 0.8, 1.2) + mean * _u(gen, 0.8, 1.2)
    new = x01.clone()
    new[:, dy:dy + ph, dx:dx + pw] = patch
    region = torch.zeros(h, w, dtype=torch.bool, device=img.device)
    region[dy:dy + ph, dx:dx + pw] = True
    return _compose(img, new, region), region


def _rotated_box(h: int, w: int, cy: float, cx: float, half_len: float, half_wid: float, angle: float,
                 device) -> torch.Tensor:
    ys = torch.arange(h, device=device, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32).view(1, -1) + 0.5
    dy, dx = ys - cy, xs - cx
    c, s = math.cos(angle), math.sin(angle)
    along = dx * c + dy * s
    across = -dx * s + dy * c
    return (along.abs() <= half_len) & (across.abs() <= half_wid)


def scar(img: torch.Tensor, gen: torch.Generator, width: tuple[float, float] = (0.01, 0.06),
         length: tuple[float, float] = (0.08, 0.3)) -> tuple[torch.Tensor, torch.Tensor]:
    _check(img)
    _, h, w = img.shape
    side = min(h, w)
    half_wid = max(0.5, _u(gen, *width) * side / 2)
    half_len = max(1.0, _u(gen, *length) * side / 2)
    cy, cx = _u(gen, 0, h), _u(gen, 0, w)
    region = _ensure_nonempty(_rotated_box(h, w, cy, cx, half_len, half_wid, _u(gen, 0, math.pi), img.device), cy, cx)
    if _is_gray(img):
        color = torch.full((3,), _u(gen), device=img.device)
    else:
        color = torch.tensor([_u(gen), _u(gen), _u(gen)], device=img.device)
    new = color.view(3, 1, 1).expand(3, h, w)
    return _compose(img, new, region), region


def noise_blob(img: torch.Tensor, gen: torch.Generator, radius: tuple[float, float] = (0.03, 0.12),
               strength: tuple[float, float] = (0.5, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    _check(img)
    _, h, w = img.shape
    side = min(h, w)
    ry, rx = max(1.0, _u(gen, *radius) * side), max(1.0, _u(gen, *radius) * side)
    cy, cx = _u(gen, 0, h), _u(gen, 0, w)
    angle = _u(gen, 0, math.pi)
    ys = torch.arange(h, device=img.device, dtype=torch.float32).view(-1, 1) + 0.5 - cy
    xs = torch.arange(w, device=img.device, dtype=torch.float32).view(1, -1) + 0.5 - cx
    c, s = math.cos(angle), math.sin(angle)
    u, v = xs * c + ys * s, -xs * s + ys * c
    region = _ensure_nonempty((u / rx) ** 2 + (v / ry) ** 2 <= 1.0, cy, cx)
    shape = (1, h, w) if _is_gray(img) else (3, h, w)
    noise = torch.rand(shape, generator=gen).to(img.device).expand(3, h, w)
    alpha = _u(gen, *strength)
    new = (1 - alpha) * _to01(img) + alpha * noise
    return _compose(img, new, region), region


SYNTHESISERS: dict[str, Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]] = {
    "cutpaste": cut_paste,
    "scar": scar,
    "noise": noise_blob,
}


def synthesize(img: torch.Tensor, gen: torch.Generator, kinds: Sequence[str] = tuple(SYNTHESISERS)
               ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One anomaly of a kind drawn uniformly from ``kinds``: ``(image, region, kind)``."""
    unknown = [k for k in kinds if k not in SYNTHESISERS]
    if not kinds or unknown:
        raise ValueError(f"unknown anomaly kinds {unknown or kinds}; known: {', '.join(SYNTHESISERS)}")
    kind = kinds[_randint(gen, 0, len(kinds) - 1)]
    out, region = SYNTHESISERS[kind](img, gen)
    return out, region, kind


def synthesize_batch(x: torch.Tensor, gen: torch.Generator, kinds: Sequence[str] = tuple(SYNTHESISERS)) -> torch.Tensor:
    """One synthetic anomaly per image of ``[B,3,H,W]``."""
    return torch.stack([synthesize(img, gen, kinds)[0] for img in x])
