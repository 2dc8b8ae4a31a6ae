"""Score new images with a bundle: a results table plus anomaly-map overlay PNGs.

Overlay colours use the calibrated per-pixel score (the map passed through the same
normalisation as the image score), so red means "above the production threshold" in
every overlay, not "highest pixel of this image".
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch

from .bundle import Detector, load_detector, to_model_input
from .calibration import normalise
from .data.images import is_image_filename
from .errors import UserError
from .plots import overlay
from .runtime import atomic_write

from .filenames import RESULTS_FILE  # noqa: E402


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



def predict_paths(
    bundle: Union[str, Path, Detector],
    paths: Iterable[Union[str, Path]],
    out_dir: Optional[Path] = None,
    *,
    overlays: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> list[dict]:
    """Score files/folders; with ``out_dir`` write ``results.csv`` and ``overlays/<name>.png``."""
    from PIL import Image

    from .progress import track_steps

    detector = bundle if isinstance(bundle, Detector) else load_detector(bundle, device)
    files = expand_inputs(paths)
    rows: list[dict] = []
    if out_dir is not None and overlays:
        (Path(out_dir) / "overlays").mkdir(parents=True, exist_ok=True)
    step = detector.inference.batch_size
    with track_steps("predict", len(files), enabled=progress) as bar:
        for start in range(0, len(files), step):
            chunk = files[start : start + step]
            arrays = [to_model_input(f, detector.image_size) for f in chunk]
            results = detector.predict_uint8(torch.from_numpy(np.stack(arrays)), return_map=overlays and out_dir is not None)
            for i, (f, r) in enumerate(zip(chunk, results)):
                row = {"path": str(f), "score": r["score"], "normalized_score": r["normalized_score"], "decision": r["decision"]}
                if "anomaly_map" in r:
                    png = Path(out_dir) / "overlays" / f"{start + i:05d}_{f.stem}.png"
                    img = overlay(arrays[i], normalise(r["anomaly_map"], detector.calibration))
                    atomic_write(png, lambda p, img=img: Image.fromarray(img).save(p, format="PNG"))
                    row["overlay"] = str(png)
                rows.append(row)
            bar.advance(len(chunk))
    if out_dir is not None:
        write_results(rows, Path(out_dir) / RESULTS_FILE)
    return rows


def write_results(rows: list[dict], path: Path) -> Path:
    fields = ["path", "score", "normalized_score", "decision", "overlay"]

    def _write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, _write)
