"""Evaluate a bundle on a manifest's test split: the metrics JSON the pipeline passes on.

Maps are computed at the model's input size; masks are resized (nearest) to the same
size, so ``pixel_auroc`` and ``aupro`` are measured at evaluation size as in the paper.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .bundle import Detector, load_detector
from .calibration import decide, normalise
from .data.cache import load_resized
from .data.manifest import Manifest
from .errors import UserError
from .metrics import compute_all
from .runtime import atomic_write

METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"


def evaluate_bundle(
    bundle_dir: Union[str, Path, Detector],
    manifest: Manifest,
    *,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    device: str = "auto",
    keep_maps: bool = False,
) -> dict:
    """Score every test image; return (and write, with ``out_dir``) the metrics payload.

    With ``keep_maps`` the payload also carries ``"_maps"`` (float32 [N,S,S]) and
    ``"_images"`` (uint8 [N,3,S,S]) for overlay plots; they are never written to JSON.
    """
    detector = bundle_dir if isinstance(bundle_dir, Detector) else load_detector(bundle_dir, device)
    test = manifest.select(split="test")
    if len(test) == 0:
        raise UserError(f"{manifest.root}: the manifest has no test images to evaluate on")
    labels = np.asarray(test.labels)
    if len(set(labels.tolist())) < 2:
        raise UserError(f"{manifest.root}: the test split needs both normal and anomalous images for metrics")
    with_masks = bool(manifest.has_masks)
    images, masks, _ = load_resized(test, detector.image_size, with_masks=with_masks, progress=progress)
    from .progress import track_steps

    with track_steps("evaluate", len(test), enabled=progress) as bar:
        maps, scores = [], []
        for start in range(0, len(test), detector.inference.batch_size):
            m, s = detector.score_uint8(images[start : start + detector.inference.batch_size])
            maps.append(m)
            scores.append(s)
            bar.advance(len(s))
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    metrics = compute_all(labels, scores, masks.numpy() if with_masks else None, maps if with_masks else None)
    norm = normalise(scores, detector.calibration)
    flags = decide(scores, detector.calibration)
    metrics["threshold"] = float(detector.calibration.threshold)
    metrics["precision_at_threshold"], metrics["recall_at_threshold"], metrics["fpr_at_threshold"] = _rates(labels, flags)
    payload = {
        "metrics": metrics,
        "dataset_fingerprint": manifest.fingerprint,
        "bundle_fingerprint": detector.fingerprint,
        "n_images": int(len(test)),
        "n_anomalous": int(labels.sum()),
        "per_image": [
            {
                "path": e.path,
                "label": int(e.label),
                "defect_type": e.defect_type,
                "score": float(scores[i]),
                "normalized_score": float(norm[i]),
                "decision": bool(flags[i]),
            }
            for i, e in enumerate(test.entries)
        ],
    }
    if out_dir is not None:
        write_metrics(payload, Path(out_dir))
    if keep_maps:
        payload["_maps"], payload["_images"] = maps, images.numpy()
    return payload


def _rates(labels: np.ndarray, flags: np.ndarray) -> tuple[float, float, float]:
    tp = float(np.sum(flags & (labels == 1)))
    fp = float(np.sum(flags & (labels == 0)))
    fn = float(np.sum(~flags & (labels == 1)))
    tn = float(np.sum(~flags & (labels == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    return precision, recall, fpr


def write_metrics(payload: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in payload.items() if not k.startswith("_")}
    atomic_write(out_dir / METRICS_FILE, lambda p: p.write_text(json.dumps(public, indent=1)))

    def _csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "label", "defect_type", "score", "normalized_score", "decision"])
            w.writeheader()
            w.writerows(payload["per_image"])

    atomic_write(out_dir / SCORES_FILE, _csv)
    return out_dir / METRICS_FILE
