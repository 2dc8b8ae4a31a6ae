"""Decoding image and mask files into arrays, the same way everywhere.

Every step (validation, training, evaluation, serving) reads pixels through
:func:`load_image_rgb` and :func:`load_mask`, so a file always becomes the same array.
Servers receive encoded files as bytes or base64 (:func:`decode_image_bytes`,
:func:`decode_base64_image`): same rules, same array as the file.

Conversion rules of :func:`load_image_rgb` (output: ``uint8 [H, W, 3]``):

* ``RGB``: as stored.
* ``L`` / ``1`` (grayscale, bilevel): the gray value copied into the three channels,
  so gray 128 becomes (128, 128, 128).
* ``LA`` / ``RGBA`` / ``PA`` / ``P`` with a transparent colour / ``RGBa``: composited
  onto **black** (``value * alpha / 255``), then the alpha channel is dropped. Fully
  transparent pixels therefore read as black, like the zero padding a CNN sees.
* ``P`` (palette), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: Pillow's conversion
  to RGB.
* 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, ``I;16S``) and 32-bit
  integer ``I`` holding 16-bit data (16-bit PNGs): scaled by the bit depth, ``value >> 8``
  (65535 becomes 255), never by the image's own min/max, so brightness is comparable
  between images. ``I`` images with values above 65535 are treated as 32-bit
  (``value >> 24``); negative values clip to 0.
* ``F`` (32-bit float): if the maximum is at most 1.0 the data is taken as [0, 1] and
  scaled by 255, otherwise it is taken as [0, 255]; both clipped, NaN read as 0.

EXIF orientation tags are **not** applied: pixels are used as stored, so an image and its
mask (which rarely carries EXIF) stay aligned.

Broken files: the file is fully decoded inside ``try`` (``img.load()``) and any failure,
including truncation, raises :class:`~recontrast_core.errors.DataValidationError` naming
the file. ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default ``False``; this
module refuses to work if someone switched it on, because truncated files would then
silently decode with grey/black padding.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import DataValidationError

PathLike = Union[str, os.PathLike]

#: File extensions (lower case) accepted as images. Anything else in an image folder is a
#: validation error.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S")


def is_image_filename(path: PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _check_truncation_flag() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; recontrast needs it False so that "
            "truncated images are reported instead of silently padded"
        )


def open_image(path: PathLike, *, decode: bool = True) -> Image.Image:
    """Open ``path`` with Pillow; with ``decode`` also decode every pixel (``img.load()``).

    Without ``decode`` only the header is read (cheap: size and mode are known, truncation
    is not detected). Any failure raises :class:`DataValidationError` naming the file.
    """
    _check_truncation_flag()
    try:
        img = Image.open(path)
    except FileNotFoundError as exc:
        raise DataValidationError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise DataValidationError(path, "is a directory, expected an image file") from exc
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataValidationError(path, f"not a readable image ({_describe(exc)})") from exc
    if decode:
        try:
            img.load()
        except Exception as exc:  # truncated data, corrupt stream, decompression bomb
            img.close()
            raise DataValidationError(
                path, f"image cannot be decoded, truncated or corrupt ({_describe(exc)})"
            ) from exc
    return img


def image_size(path: PathLike) -> tuple[int, int]:
    """``(width, height)`` from the header only (cheap; does not detect truncation)."""
    with open_image(path, decode=False) as img:
        return img.size


def load_image_rgb(path: PathLike) -> np.ndarray:
    """Decode ``path`` to ``uint8 [H, W, 3]`` following the module's conversion rules."""
    img = open_image(path, decode=True)
    try:
        return to_rgb_array(img)
    except DataValidationError:
        raise
    except Exception as exc:
        raise DataValidationError(path, f"unsupported image ({_describe(exc)})") from exc
    finally:
        img.close()


#: Pillow formats :func:`decode_image_bytes` accepts: the files :data:`IMAGE_EXTENSIONS`
#: name. Nothing else is tried on bytes from the network (no EPS, PSD, ... decoders).
ENCODED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


def decode_image_bytes(data: bytes, name: str = "image bytes") -> np.ndarray:
    """Encoded image file bytes (PNG, JPEG, BMP, TIFF, WebP) -> ``uint8 [H, W, 3]``, by the
    same rules as :func:`load_image_rgb` (so a file and its bytes score the same). Any
    failure raises :class:`DataValidationError` naming ``name`` (e.g. ``"row 3"``)."""
    _check_truncation_flag()
    if not data:
        raise DataValidationError(name, "empty image data")
    Image.init()  # registers every plugin (TIFF and WebP are not preloaded)
    try:
        img = Image.open(io.BytesIO(data), formats=[f for f in ENCODED_FORMATS if f in Image.OPEN])
    except UnidentifiedImageError as exc:
        raise DataValidationError(name, "not a readable PNG/JPEG/BMP/TIFF/WebP image") from exc
    except Exception as exc:  # a decompression bomb, a broken header
        raise DataValidationError(name, f"not a readable PNG/JPEG/BMP/TIFF/WebP image ({_describe(exc)})") from exc
    try:
        img.load()
    except Exception as exc:  # truncated data, corrupt stream
        img.close()
        raise DataValidationError(
            name, f"not a readable PNG/JPEG/BMP/TIFF/WebP image: truncated or corrupt ({_describe(exc)})"
        ) from exc
    try:
        return to_rgb_array(img)
    except Exception as exc:
        raise DataValidationError(name, f"unsupported image ({_describe(exc)})") from exc
    finally:
        img.close()


def decode_base64_image(text: str | bytes, name: str = "image_b64") -> np.ndarray:
    """Base64 of an encoded image file (whitespace and a ``data:image/...;base64,`` prefix
    are allowed) -> ``uint8 [H, W, 3]`` via :func:`decode_image_bytes`."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise DataValidationError(name, f"expected a base64 string, got {type(text).__name__}")
    text = "".join(text.split())
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataValidationError(name, f"not valid base64 ({_describe(exc)})") from exc
    return decode_image_bytes(data, name)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert an already decoded Pillow image to ``uint8 [H, W, 3]`` (see module doc)."""
    mode = img.mode
    if mode == "RGB":
        out = np.asarray(img, dtype=np.uint8)
    elif mode in ("L", "1"):
        out = _gray_to_rgb(np.asarray(img.convert("L"), dtype=np.uint8))
    elif mode in _16BIT_MODES or mode == "I":
        out = _gray_to_rgb(_int_to_uint8(np.asarray(img), mode))
    elif mode == "F":
        out = _gray_to_rgb(_float_to_uint8(np.asarray(img, dtype=np.float32)))
    elif mode == "LA" or mode == "La":
        la = np.asarray(img.convert("LA"), dtype=np.uint8)
        out = _gray_to_rgb(_composite_on_black(la[..., :1], la[..., 1])[..., 0])
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        out = _composite_on_black(rgba[..., :3], rgba[..., 3])
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
        out = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:  # pragma: no cover - defensive
        raise ValueError(f"mode {mode} converted to shape {out.shape}")
    return np.ascontiguousarray(out)


def load_mask(path: PathLike) -> np.ndarray:
    """Decode a ground-truth mask to ``bool [H, W]`` (True = defect).

    A mask is binary. The file is reduced to one channel (the **maximum over the colour
    channels** for colour masks, so a pure red defect counts; alpha is ignored), then
    thresholded at half of its bit depth's range if any value exceeds that half (0/255
    masks, including JPEG-noisy ones: ``> 127``; 16-bit 0/65535: ``> 32767``), and at
    ``> 0`` otherwise (0/1 masks and small-integer label maps: any nonzero is a defect).
    """
    img = open_image(path, decode=True)
    try:
        a, full = _mask_channel(img)
    except Exception as exc:
        raise DataValidationError(path, f"unsupported mask image ({_describe(exc)})") from exc
    finally:
        img.close()
    if a.size == 0:
        return np.zeros(a.shape, dtype=bool)
    a = np.nan_to_num(a, nan=0.0) if a.dtype.kind == "f" else a
    half = full / 2
    thr = half if float(a.max()) > half else 0
    return np.ascontiguousarray(a > thr)


def _mask_channel(img: Image.Image) -> tuple[np.ndarray, float]:
    mode = img.mode
    if mode in _16BIT_MODES or mode == "I":
        a = np.asarray(img).astype(np.int64)
        full = 65535.0 if a.size == 0 or a.max() <= 65535 else float(2**32 - 1)
        return a, full
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        full = 1.0 if a.size == 0 or np.nanmax(a) <= 1.0 else 255.0
        return a, full
    if mode in ("1", "L", "P") and not (mode == "P" and _palette_is_colour(img)):
        return np.asarray(img.convert("L"), dtype=np.uint8), 255.0
    if mode in ("LA", "La"):
        return np.asarray(img.convert("LA"), dtype=np.uint8)[..., 0], 255.0
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return rgb.max(axis=2), 255.0


def _palette_is_colour(img: Image.Image) -> bool:
    try:
        pal = img.getpalette() or []
    except Exception:  # pragma: no cover
        return True
    trip = np.asarray(pal[: len(pal) // 3 * 3], dtype=np.int32).reshape(-1, 3)
    return bool((trip.max(axis=1) != trip.min(axis=1)).any())


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2)


def _composite_on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c = colour.astype(np.uint16) * alpha[..., None].astype(np.uint16)
    # Rounded division by 255.
    return ((c + 127) // 255).astype(np.uint8)


def _int_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.int64)
    np.clip(a, 0, None, out=a)
    if mode == "I" and a.size and a.max() > 65535:
        return (np.minimum(a, 2**32 - 1) >> 24).astype(np.uint8)
    return (np.minimum(a, 65535) >> 8).astype(np.uint8)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if a.size and a.max() <= 1.0:
        a = np.clip(a, 0.0, 1.0) * 255.0
    else:
        a = np.clip(a, 0.0, 255.0)
    return np.rint(a).astype(np.uint8)


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
