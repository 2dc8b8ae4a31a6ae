"""Evaluate a bundle (any model kind) on a manifest's test split: the metrics JSON the pipeline passes on.

**Which images.** Only the test split's *report half* (:mod:`recontrast_core.selection`:
the images whose file name hashes odd) when the split has labelled anomalies and both
halves hold normal and anomalous images; the other half (the validation half) chose the
model kind and the baseline's setting, so it never counts. Otherwise the whole test split.
The payload says which (``evaluation_split``).

Maps are computed at the model's input size; masks are resized (nearest) to the same
size, so ``pixel_auroc`` and ``aupro`` are measured at evaluation size as in the paper.

Beside the model, the training-free baseline scores the same images: by default the
strongest patch-kNN setting of the training-free grid on the validation split (an ``auto``
bundle's recorded choice, else the grid runs here), fitted on the normal training images
(few-shot: the same shots), at its own resolution; ``baseline.grid: false`` keeps the older
baseline (the bundle's frozen encoder at its size). Its metrics are reported as
``baseline_<name>`` (and under ``"baseline"``), with the paired bootstrap interval of the
model's image AUROC minus the baseline's (``baseline_delta_image_auroc_lo`` / ``_hi``), which
the registry's baseline floor reads.

**Operating point.** ``precision_at_threshold``, ``recall_at_threshold`` and
``fpr_at_threshold`` at the stored threshold (calibrated on held-out normals at
``calibration.target_fpr``), and ``recall_at_target_fpr``: the best recall any threshold
gives on these images at that FPR (what a perfectly placed threshold would catch).

**Normal-only test sets** (no anomalous test image anywhere, e.g. a plant that has not
collected defects yet): AUROC, F1, precision and recall are undefined, so evaluation
reports what can be measured: ``fpr_at_threshold`` (the share of the held-out normal test
images flagged at the stored threshold), the score distribution (``score_mean``,
``score_std``, ``score_min``, ``score_p50``, ``score_p90``, ``score_p95``, ``score_p99``,
``score_max``) and, unless ``synthetic=False``, ``synthetic_image_auroc``: the image AUROC
of the normal test images against one synthesised anomaly of each (COFT-AD's cut-paste /
scar / noise synthesiser, :func:`recontrast_core.adapt.synth.synthesize_batch`, seeded).
It is labelled synthetic because it is not a measurement on real defects. The payload
gains a ``note`` saying so; everything else keeps its format. The registry compares only
the metrics both models have: without ``image_auroc`` (the default primary metric) such a
candidate is not promoted. The baseline reports the same keys (``baseline_score_*``,
``baseline_synthetic_image_auroc``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .bundle import Detector, load_detector
from .calibration import decide, normalise
from .config import BaselineConfig, CalibrationConfig, InferenceConfig, ModelConfig, PatchKnnConfig
from .data.cache import load_resized
from .data.manifest import Manifest, split_validation
from .errors import UserError
from .metrics import compute_all
from .runtime import atomic_write
from .selection import Halves, split_test

from .filenames import METRICS_FILE, SCORES_FILE  # noqa: E402  (re-exported)

NORMAL_ONLY_NOTE = (
    "normal-only test set: no anomalous test image, so image/pixel AUROC, AUPRO and F1 cannot be measured; "
    "reported instead: fpr_at_threshold on the held-out normal test images, the score distribution (score_*) and "
    "synthetic_image_auroc (normal test images against synthesised anomalies, not real defects). The registry "
    "compares only metrics both models have: without image_auroc this candidate is not promoted."
)
SYNTHETIC_SEED = 0
DEFAULT_TARGET_FPR = 0.01  # recall_at_target_fpr for a calibration fitted by F1 (no target)


def evaluate_bundle(
    bundle_dir: Union[str, Path, Detector],
    manifest: Manifest,
    *,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    device: str = "auto",
    keep_maps: bool = False,
    baseline: Optional[BaselineConfig] = None,
    synthetic: bool = True,
    baseline_train: Optional[Manifest] = None,
    model_settings: Optional[ModelConfig] = None,
) -> dict:
    """Score every test image; return (and write, with ``out_dir``) the metrics payload.

    A test split of normal images only is evaluated as the module doc says (``synthetic``:
    also score synthesised anomalies); one of anomalous images only is refused.

    ``baseline``: settings of the training-free baseline scored beside the model on the
    same test images (needs normal training images in ``manifest``); None or
    ``enabled=False`` skips it. With ``keep_maps`` the payload also carries ``"_maps"``
    (float32 [N,S,S]) and ``"_images"`` (uint8 [N,3,S,S]) for overlay plots; they are never
    written to JSON.
    """
    detector = bundle_dir if isinstance(bundle_dir, Detector) else load_detector(bundle_dir, device)
    if len(manifest.select(split="test")) == 0:
        raise UserError(f"{manifest.root}: the manifest has no test images to evaluate on")
    halves = split_test(manifest)
    test = halves.report
    if len(test) == 0:
        raise UserError(f"{manifest.root}: the manifest has no test images to evaluate on")
    labels = np.asarray(test.labels)
    normal_only = set(labels.tolist()) == {0}
    if set(labels.tolist()) == {1}:
        raise UserError(f"{manifest.root}: the test split holds only anomalous images; metrics need normal test "
                        "images too (hold some out of training)")
    with_masks = bool(manifest.has_masks) and not normal_only
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
    if normal_only:
        metrics = score_distribution(scores)
        if synthetic:
            metrics["synthetic_image_auroc"] = synthetic_auroc(
                lambda x: _score_batches(detector, x), images, scores)
    else:
        metrics = compute_all(labels, scores, masks.numpy() if with_masks else None, maps if with_masks else None)
    base = None
    if baseline is not None and baseline.enabled:
        base = baseline_metrics(detector, manifest, images, labels, masks if with_masks else None, baseline, progress,
                                synthetic=synthetic, halves=halves, train=baseline_train, model_settings=model_settings)
        metrics.update({f"baseline_{k}": v for k, v in base["metrics"].items()})
        base_scores = base.pop("_scores")
        if not normal_only:
            from .metrics import paired_bootstrap_delta

            boot = paired_bootstrap_delta(labels, scores, base_scores)
            metrics["baseline_delta_image_auroc_lo"], metrics["baseline_delta_image_auroc_hi"] = boot["lo"], boot["hi"]
            metrics["baseline_delta_image_auroc_confidence"] = boot["confidence"]
            base["image_auroc_delta"] = boot
    norm = normalise(scores, detector.calibration)
    flags = decide(scores, detector.calibration)
    metrics["threshold"] = float(detector.calibration.threshold)
    precision, recall, fpr = _rates(labels, flags)
    if not normal_only:  # precision and recall need anomalies
        metrics["precision_at_threshold"], metrics["recall_at_threshold"] = precision, recall
        target = detector.calibration.target_fpr or DEFAULT_TARGET_FPR
        metrics["recall_at_target_fpr"] = recall_at_fpr(labels, scores, target)
    metrics["fpr_at_threshold"] = fpr
    payload = {
        "metrics": metrics,
        "dataset_fingerprint": manifest.fingerprint,
        "bundle_fingerprint": detector.fingerprint,
        "n_images": int(len(test)),
        "n_anomalous": int(labels.sum()),
        "model": {"kind": detector.kind, "selection": detector.meta.get("selection")},
        "evaluation_split": halves.describe(),
        "operating_point": {
            "threshold": float(detector.calibration.threshold), "method": detector.calibration.method,
            "target_fpr": detector.calibration.target_fpr, "n_calibration_normals": detector.calibration.n_normal,
            "note": "recall_at_target_fpr: the recall the best threshold on these images would give at the "
                    "calibration's target FPR (an upper bound for the stored threshold's recall_at_threshold)",
        },
        **({"baseline": base} if base is not None else {}),
        **({"note": NORMAL_ONLY_NOTE} if normal_only else {}),
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


def score_distribution(scores: np.ndarray) -> dict[str, float]:
    """``score_mean``, ``score_std``, ``score_min``, ``score_p50/p90/p95/p99``, ``score_max``."""
    s = np.asarray(scores, dtype=np.float64)
    out = {"score_mean": float(s.mean()), "score_std": float(s.std()), "score_min": float(s.min())}
    for q in (50, 90, 95, 99):
        out[f"score_p{q}"] = float(np.percentile(s, q))
    out["score_max"] = float(s.max())
    return out


def synthetic_auroc(score_fn, images, normal_scores: np.ndarray, seed: int = SYNTHETIC_SEED) -> float:
    """Image AUROC of ``normal_scores`` against the scores ``score_fn`` gives one seeded
    synthetic anomaly of each image (uint8 ``[N,3,S,S]``; cut-paste / scar / noise)."""
    import torch

    from .adapt.synth import synthesize_batch
    from .metrics import image_auroc

    gen = torch.Generator().manual_seed(seed)
    synth = synthesize_batch(images, gen)
    synth_scores = np.asarray(score_fn(synth), dtype=np.float64)
    labels = np.concatenate([np.zeros(len(normal_scores), dtype=int), np.ones(len(synth_scores), dtype=int)])
    return float(image_auroc(labels, np.concatenate([np.asarray(normal_scores, dtype=np.float64), synth_scores])))


def _score_batches(detector: Detector, images) -> np.ndarray:
    out = []
    for start in range(0, len(images), detector.inference.batch_size):
        out.append(detector.score_uint8(images[start : start + detector.inference.batch_size])[1])
    return np.concatenate(out)


def baseline_metrics(detector: Detector, manifest: Manifest, test_images, labels, masks, cfg: BaselineConfig,
                     progress: bool = False, synthetic: bool = True, halves: Optional[Halves] = None,
                     train: Optional[Manifest] = None, model_settings: Optional[ModelConfig] = None) -> dict:
    """The training-free baseline on the evaluated images (on a normal-only test split: the
    score distribution and the synthetic AUROC, as the model). ``train``: the normal images
    its bank is fitted on (few-shot: the same shots as the model; default: every normal
    training image). With ``cfg.grid`` the setting is the strongest of the training-free
    grid on the validation split (an ``auto`` bundle's recorded choice, else the grid is run
    now); without, the detector's own frozen encoder at its resolution."""
    import time

    from .baseline import PatchBaseline
    from .fit import ImagesBySize, run_grid, score_images
    from .models.patchknn import fit_patchknn
    from .selection import SelectionSet

    train = (train if train is not None else manifest).select(split="train", label=0)
    if len(train) == 0:
        raise UserError(f"{manifest.root}: the baseline needs the normal training images (none in the manifest)")
    halves = halves or split_test(manifest)
    t0 = time.perf_counter()
    normal_only = set(np.asarray(labels).tolist()) == {0}
    setting: dict = {"rule": "patch-kNN on the detector's frozen encoder at its resolution"}
    if cfg.grid:
        dev = detector.device
        blur_only = InferenceConfig(gaussian_sigma=cfg.gaussian_sigma)
        recorded = (detector.meta.get("selection") or {}).get("best_training_free")
        if recorded:
            pk = PatchKnnConfig.model_validate(recorded)
            setting = {"rule": "the bundle's selection: strongest training-free grid setting on its validation split"}
        else:
            fit, held = split_validation(train, CalibrationConfig().validation_fraction, 0)
            model = model_settings or ModelConfig()
            pk, grid, _ = run_grid(model, ImagesBySize(fit, None, False).at, SelectionSet(halves, held if len(held) else fit),
                                   blur_only, dev, progress=progress)
            setting = {"rule": "strongest training-free grid setting on the validation split", "grid": grid}
        setting["patchknn"] = pk.model_dump(mode="json")
        train_images = load_resized(train, pk.image_size, with_masks=False, progress=progress).images
        scorer = fit_patchknn(train_images, pk, dev)
        bank_size = scorer.bank_size
        imgs, msk, _ = load_resized(halves.report, pk.image_size, with_masks=masks is not None)
        maps, scores = score_images(scorer, blur_only, imgs, dev)
        masks = msk if masks is not None else None
        test_images = imgs
        score_fn = lambda x: score_images(scorer, blur_only, x, dev)[1]  # noqa: E731
    else:
        train_images, _, _ = load_resized(train, detector.image_size, with_masks=False, progress=progress)
        # the detector's frozen ReContrast encoder; a patch-kNN bundle's own encoder
        encoder = detector.model.frozen if detector.kind != "patchknn" else detector.scorer.encoder
        model = PatchBaseline(encoder, cfg, device=detector.device).fit(train_images)
        bank_size = int(model.bank.shape[0])
        maps, scores = model.score(test_images)
        score_fn = lambda x: model.score(x)[1]  # noqa: E731
    if normal_only:
        metrics = score_distribution(scores)
        if synthetic:
            metrics["synthetic_image_auroc"] = synthetic_auroc(score_fn, test_images, scores)
    else:
        metrics = compute_all(labels, scores, masks.numpy() if masks is not None else None,
                              maps if masks is not None else None)
        metrics = {k: v for k, v in metrics.items() if k != "image_f1_threshold"}
    return {"metrics": metrics, "settings": cfg.model_dump(mode="json"), "setting": setting, "bank_size": bank_size,
            "n_train_images": len(train), "wall_time_s": round(time.perf_counter() - t0, 2),
            "_scores": np.asarray(scores, dtype=np.float64)}


def recall_at_fpr(labels, scores, target_fpr: float) -> float:
    """The largest recall any threshold gives on these images with FPR <= ``target_fpr``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores, dtype=np.float64))
    ok = fpr <= target_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


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
