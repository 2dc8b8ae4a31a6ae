"""Evaluate a bundle on a manifest's test split: the metrics JSON the pipeline passes on.

Maps are computed at the model's input size; masks are resized (nearest) to the same
size, so ``pixel_auroc`` and ``aupro`` are measured at evaluation size as in the paper.

Beside the model, the training-free baseline (:mod:`recontrast_core.baseline`: the
bundle's frozen encoder and input statistics, patch nearest neighbours over the manifest's
normal training images) scores the same test images at the same size; its metrics are
reported as ``baseline_<name>`` (and under ``"baseline"`` in the payload), so every
evaluation says whether training earned its keep. The registry's baseline floor reads them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .bundle import Detector, load_detector
from .calibration import decide, normalise
from .config import BaselineConfig
from .data.cache import load_resized
from .data.manifest import Manifest
from .errors import UserError
from .metrics import compute_all
from .runtime import atomic_write

from .filenames import METRICS_FILE, SCORES_FILE  # noqa: E402  (re-exported)


def evaluate_bundle(
    bundle_dir: Union[str, Path, Detector],
    manifest: Manifest,
    *,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    device: str = "auto",
    keep_maps: bool = False,
    baseline: Optional[BaselineConfig] = None,
) -> dict:
    """Score every test image; return (and write, with ``out_dir``) the metrics payload.

    ``baseline``: settings of the training-free baseline scored beside the model on the
    same test images (needs normal training images in ``manifest``); None or
    ``enabled=False`` skips it. With ``keep_maps`` the payload also carries ``"_maps"``
    (float32 [N,S,S]) and ``"_images"`` (uint8 [N,3,S,S]) for overlay plots; they are never
    written to JSON.
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
    base = None
    if baseline is not None and baseline.enabled:
        base = baseline_metrics(detector, manifest, images, labels, masks if with_masks else None, baseline, progress)
        metrics.update({f"baseline_{k}": v for k, v in base["metrics"].items()})
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
        **({"baseline": base} if base is not None else {}),
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


def baseline_metrics(detector: Detector, manifest: Manifest, test_images, labels, masks, cfg: BaselineConfig,
                     progress: bool = False) -> dict:
    """The training-free baseline on the same (already resized) test images."""
    import time

    from .baseline import PatchBaseline

    train = manifest.select(split="train", label=0)
    if len(train) == 0:
        raise UserError(f"{manifest.root}: the baseline needs the normal training images (none in the manifest)")
    t0 = time.perf_counter()
    train_images, _, _ = load_resized(train, detector.image_size, with_masks=False, progress=progress)
    model = PatchBaseline(detector.model.frozen, cfg, device=detector.device).fit(train_images)
    maps, scores = model.score(test_images)
    metrics = compute_all(labels, scores, masks.numpy() if masks is not None else None,
                          maps if masks is not None else None)
    metrics = {k: v for k, v in metrics.items() if k != "image_f1_threshold"}
    return {"metrics": metrics, "settings": cfg.model_dump(mode="json"), "bank_size": int(model.bank.shape[0]),
            "n_train_images": len(train), "wall_time_s": round(time.perf_counter() - t0, 2)}


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
