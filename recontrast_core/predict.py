"""Score new images with a bundle: a results table plus anomaly-map overlay PNGs.

Overlay colours use the calibrated per-pixel score (the map passed through the same
normalisation as the image score), so red means "above the production threshold" in
every overlay, not "highest pixel of this image".
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .bundle import Detector, load_detector, to_model_input
from .calibration import normalise
from .data.images import is_image_filename
from .errors import UserError
from .plots import overlay
from .runtime import atomic_write, ensure_output_dir, honour_umask, note_output, staged_write, step_outputs

from .filenames import RESULTS_FILE  # noqa: E402

OVERLAYS_DIR = "overlays"


def expand_inputs(paths: Iterable[Union[str, Path]]) -> list[Path]:
    """Files as given, folders walked recursively for image files (sorted); errors name the path."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and is_image_filename(f) and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    if not out:
        raise UserError("no images found in the given paths")
    return out



def _predict_paths(
    bundle: Union[str, Path, Detector],
    paths: Iterable[Union[str, Path]],
    out_dir: Optional[Path] = None,
    *,
    overlays: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> list[dict]:
    """Score files/folders; with ``out_dir`` write ``results.csv`` and ``overlays/<name>.png``.

    Every readable image is scored; an unreadable one gets a row with ``error`` (the reason)
    and no score, and the run goes on (the caller decides the exit code: see
    :func:`failed_rows`). Outputs appear together: overlays are written to a temporary
    folder and moved into ``overlays/`` only after ``results.csv`` is written, so there are
    never overlays without their table.
    """
    from PIL import Image

    from .progress import track_steps

    out = ensure_output_dir(out_dir) if out_dir is not None else None
    detector = bundle if isinstance(bundle, Detector) else load_detector(bundle, device)
    files = expand_inputs(paths)
    rows: list[dict] = []
    staging = None
    if out is not None and overlays:
        staging = Path(tempfile.mkdtemp(prefix=".overlays.", dir=out))
        honour_umask(staging, directory=True)  # mkdtemp makes it 0700
    try:
        step = detector.inference.batch_size
        with track_steps("predict", len(files), enabled=progress) as bar:
            for start in range(0, len(files), step):
                chunk = files[start : start + step]
                for i, (row, img) in enumerate(score_files(detector, chunk, overlays=staging is not None)):
                    if img is not None:
                        name = f"{start + i:05d}_{chunk[i].stem}.png"
                        staged_write(staging / name, lambda p, img=img: Image.fromarray(img).save(p, format="PNG"))
                        row["overlay"] = str(out / OVERLAYS_DIR / name)
                    rows.append(row)
                bar.advance(len(chunk))
        if out is not None:
            write_results(rows, out / RESULTS_FILE)
            if staging is not None:
                final = out / OVERLAYS_DIR
                if final.exists():
                    shutil.rmtree(final)
                staging.rename(final)
                note_output(final)
                staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return rows


def score_files(detector: Detector, files: Sequence[Union[str, Path]], *,
                overlays: bool = True) -> list[tuple[dict, Optional[np.ndarray]]]:
    """Score one batch of image files, in order: per file its row (``path``, ``score``,
    ``normalized_score``, ``decision``, ``error``) and its overlay (RGB uint8) or None.

    An unreadable file gets a row with ``error`` (the reason) and no score; the others are
    scored together. The overlay is the calibrated anomaly map on the model's input."""
    from .errors import DataValidationError

    out: list = [None] * len(files)
    arrays, readable = [], []
    for i, f in enumerate(files):
        try:
            arrays.append(to_model_input(f, detector.image_size))
            readable.append(i)
        except DataValidationError as exc:
            out[i] = ({"path": str(f), "score": None, "normalized_score": None, "decision": None,
                       "error": exc.problem}, None)
    if arrays:
        results = detector.predict_uint8(torch.from_numpy(np.stack(arrays)), return_map=overlays)
        for arr, i, r in zip(arrays, readable, results):
            img = overlay(arr, normalise(r["anomaly_map"], detector.calibration)) if overlays else None
            out[i] = ({"path": str(files[i]), "score": r["score"], "normalized_score": r["normalized_score"],
                       "decision": r["decision"], "error": ""}, img)
    return out


def failed_rows(rows: list[dict]) -> list[dict]:
    """The rows of images that could not be scored."""
    return [r for r in rows if r.get("error")]


RESULT_FIELDS = ("path", "score", "normalized_score", "decision", "error", "overlay")


def write_results(rows: Iterable[dict], path: Path, fields: Sequence[str] = RESULT_FIELDS) -> Path:
    """``rows`` (any iterable, consumed once) as CSV with columns ``fields``, written atomically."""

    def _write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, _write)


def predict_paths(bundle, paths, out_dir: Optional[Path] = None, **kw) -> list[dict]:
    """Score ``paths`` (:func:`_predict_paths`: the results table, overlays, failures); with
    ``out_dir`` the folder is held for this run: a second run into it is refused in one line."""
    if out_dir is None:
        return _predict_paths(bundle, paths, None, **kw)
    with step_outputs(Path(out_dir), "predict"):
        return _predict_paths(bundle, paths, out_dir, **kw)
