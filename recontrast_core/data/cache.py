"""Decode-and-resize once per run, keep uint8, normalise on the target device.

* :class:`ImageCache` decodes each file once (:func:`~recontrast_core.data.images.load_image_rgb`
  / :func:`~recontrast_core.data.images.load_mask`), squashes it to ``S x S`` like the
  ReContrast paper (no aspect-ratio preservation, no crop) and keeps the ``uint8`` result
  in memory, so training, calibration and evaluation share one decode. Images use Pillow's
  bilinear resize (antialiased when downsampling), masks nearest-neighbour.
* With ``cache_dir`` the resized arrays are also stored as ``.npy`` files keyed by the
  file content hash when the manifest has one (``ManifestEntry.sha256``) or by
  path + mtime + size otherwise, plus the size and a format version; later runs skip
  decoding. Writes are atomic; an unreadable cache file is recomputed.
* :func:`normalize` turns a ``uint8 [N,3,S,S]`` batch into ImageNet-normalised floats on
  the device (transfer stays uint8: 4x less host-to-device traffic).
* :func:`batch_slices` is the tiny batch iterator; the trainer samples indices itself.

Rows without a mask (normal images, or datasets without ground truth) get all-False masks.
Rows whose pixels come from an annotation reference (a LabelMe / COCO mask rasterised on
demand, a LabelMe embedded image: :mod:`recontrast_core.data.annotations`) go through the
same cache; their disk key is the manifest's content hash, or the annotation file's path,
mtime and size plus the selector.
"""

from __future__ import annotations

import hashlib
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
from PIL import Image

from .annotations import load_source_image, load_source_mask
from .images import load_image_rgb, load_mask
from .manifest import AnnotationRef, Manifest, ManifestEntry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CACHE_VERSION = "v1"


class ResizedSet(NamedTuple):
    images: torch.Tensor  # uint8 [N, 3, S, S]
    masks: Optional[torch.Tensor]  # bool [N, S, S] or None
    labels: torch.Tensor  # int64 [N]


def resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [H,W,3]`` -> ``uint8 [S,S,3]``, bilinear with antialiasing."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return np.array(rgb, dtype=np.uint8, order="C")  # writable copy
    out = Image.fromarray(rgb).resize((size, size), Image.BILINEAR)
    return np.array(out, dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``bool [H,W]`` -> ``bool [S,S]``, nearest neighbour."""
    if mask.shape[0] == size and mask.shape[1] == size:
        return np.array(mask, dtype=bool, order="C")
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((size, size), Image.NEAREST)) > 127  # a new array


class ImageCache:
    """Per-run cache of resized ``uint8`` images and ``bool`` masks at one size.

    Keys are absolute file paths, so the same file listed in several manifests (or
    twice in one) is decoded once. ``workers`` threads decode in parallel (Pillow
    releases the GIL while decoding).
    """

    def __init__(
        self,
        image_size: int,
        *,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        workers: int = 2,
        keep_in_memory: bool = True,
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, not {image_size}")
        self.image_size = int(image_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.workers = max(1, int(workers))
        self.keep_in_memory = keep_in_memory
        self._mem: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        #: number of files actually decoded (not served from memory or disk)
        self.decoded = 0

    # ---- keys and disk -------------------------------------------------------------------
    def _disk_key(self, path: "Path | AnnotationRef", kind: str, content_sha: Optional[str]) -> str:
        if content_sha and isinstance(path, AnnotationRef):
            ident = f"sha:{content_sha}#{path.selector}"
        elif content_sha:
            ident = f"sha:{content_sha}"
        elif isinstance(path, AnnotationRef):
            st = path.file.stat()
            ident = f"file:{path.file.resolve()}#{path.selector}|{st.st_mtime_ns}|{st.st_size}"
        else:
            st = path.stat()
            ident = f"file:{path.resolve()}|{st.st_mtime_ns}|{st.st_size}"
        raw = f"{_CACHE_VERSION}|{kind}|{self.image_size}|{ident}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def _disk_file(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.npy"

    def _load_disk(self, key: str, kind: str) -> Optional[np.ndarray]:
        f = self._disk_file(key)
        if not f.is_file():
            return None
        try:
            arr = np.load(f, allow_pickle=False)
        except Exception:
            return None
        s = self.image_size
        want = (s, s, 3) if kind == "image" else (s, s)
        want_dtype = np.uint8 if kind == "image" else np.bool_
        if arr.shape != want or arr.dtype != want_dtype:
            return None
        return arr

    def _save_disk(self, key: str, arr: np.ndarray) -> None:
        f = self._disk_file(key)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, arr, allow_pickle=False)
            os.replace(tmp, f)
        except OSError:  # a read-only or full cache dir only costs speed
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    # ---- one file ------------------------------------------------------------------------
    def _get(self, path: "Path | AnnotationRef", kind: str, content_sha: Optional[str]) -> np.ndarray:
        mem_key = (str(path), kind)
        with self._lock:
            hit = self._mem.get(mem_key)
        if hit is not None:
            return hit
        arr = None
        disk_key = None
        if self.cache_dir is not None:
            disk_key = self._disk_key(path, kind, content_sha)
            arr = self._load_disk(disk_key, kind)
        if arr is None:
            if kind == "image":
                if isinstance(path, AnnotationRef):
                    arr = resize_image(load_source_image(path), self.image_size)
                else:
                    arr = resize_image(load_image_rgb(path), self.image_size)
            elif isinstance(path, AnnotationRef):
                arr = resize_mask(load_source_mask(path), self.image_size)
            else:
                arr = resize_mask(load_mask(path), self.image_size)
            with self._lock:
                self.decoded += 1
            if disk_key is not None:
                self._save_disk(disk_key, arr)
        if self.keep_in_memory:
            with self._lock:
                self._mem[mem_key] = arr
        return arr

    # ---- a manifest ----------------------------------------------------------------------
    def load(self, manifest: Manifest, with_masks: bool = False, *, progress: bool = False) -> ResizedSet:
        """Resized tensors for every row of ``manifest`` (row order kept)."""
        entries = manifest.entries
        n, s = len(entries), self.image_size
        # Filled with numpy (no torch intra-op threads competing with the decoders),
        # wrapped as tensors without a copy at the end.
        images = np.empty((n, 3, s, s), dtype=np.uint8)
        masks = np.zeros((n, s, s), dtype=bool) if with_masks else None
        labels = torch.tensor([e.label for e in entries], dtype=torch.int64)

        # Unique (path, kind) jobs, so a file listed twice is decoded once; each result is
        # written into its rows as soon as it arrives and then dropped (peak memory: the
        # output tensors plus a few in-flight arrays, when keep_in_memory is off).
        jobs: dict[tuple[str, str], tuple["Path | AnnotationRef", str, Optional[str]]] = {}
        rows: dict[tuple[str, str], list[int]] = {}
        for i, e in enumerate(entries):
            p = manifest.source(e.path)
            key = (str(p), "image")
            jobs.setdefault(key, (p, "image", _content_sha(e)))
            rows.setdefault(key, []).append(i)
            if with_masks and e.mask_path:
                mp = manifest.source(e.mask_path)
                key = (str(mp), "mask")
                jobs.setdefault(key, (mp, "mask", None))
                rows.setdefault(key, []).append(i)

        bar = _make_bar(progress, len(jobs))
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                futures = {pool.submit(self._get, *job): key for key, job in jobs.items()}
                try:
                    for fut in as_completed(futures):
                        key = futures.pop(fut)  # drop our reference to the result
                        arr = fut.result()
                        if key[1] == "image":
                            chw = arr.transpose(2, 0, 1)
                            for i in rows[key]:
                                images[i] = chw
                        else:
                            for i in rows[key]:
                                masks[i] = arr  # type: ignore[index]
                        if bar is not None:
                            bar[0].advance(1)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            if bar is not None:
                bar[1]()
        return ResizedSet(
            torch.from_numpy(images),
            torch.from_numpy(masks) if masks is not None else None,
            labels,
        )

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()


def _content_sha(e: ManifestEntry) -> Optional[str]:
    # ManifestEntry.sha256 covers image and mask together: a conservative image key.
    return e.sha256


def _make_bar(progress: bool, total: int):
    if not progress or total == 0:
        return None
    from ..progress import open_bar

    return open_bar("decode", total)


def load_resized(
    manifest: Manifest,
    image_size: int,
    with_masks: bool = False,
    *,
    progress: bool = False,
    cache: Optional[ImageCache] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    workers: int = 2,
) -> ResizedSet:
    """``(images uint8 [N,3,S,S], masks bool [N,S,S] | None, labels int64 [N])``.

    Pass a shared ``cache`` (an :class:`ImageCache`) to decode each file once across
    several calls in a run; without one, files are decoded once per call (duplicates
    within the call still once) and nothing is retained beyond the returned tensors.
    """
    if cache is None:
        # A throwaway cache keeps nothing in memory: the returned tensors are the only copy.
        cache = ImageCache(image_size, cache_dir=cache_dir, workers=workers, keep_in_memory=False)
    elif cache.image_size != image_size:
        raise ValueError(f"cache holds {cache.image_size}px images, asked for {image_size}px")
    return cache.load(manifest, with_masks, progress=progress)


def normalize(
    images_uint8: torch.Tensor,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
) -> torch.Tensor:
    """Normalise ``uint8 [...,3,H,W]`` with ``mean``/``std`` (of [0, 1] inputs) on ``device``
    (transfer as uint8 first). The backbone says which statistics (``Encoder.stats``)."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {images_uint8.dtype}")
    x = images_uint8.to(device, non_blocking=True) if device is not None else images_uint8
    x = x.to(dtype).div_(255.0)
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(shape)
    return x.sub_(m).div_(s)


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive ``slice`` objects covering ``range(n)`` in batches (last may be short)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
