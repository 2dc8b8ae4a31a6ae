"""Recalibration: a new threshold and score normalisation from new normal images, same weights.

A line's images drift (new lighting, a new batch of parts) while the detector still ranks
them well: the threshold is then what is off. :func:`recalibrate_bundle` scores the new
normal images with a bundle, fits the calibration with the training rule
(:func:`~recontrast_core.calibration.fit_calibration`, normal images only: the
``1 - target_fpr`` quantile, ``method="fpr"``) and writes a new bundle beside it:

* ``model.safetensors`` is the parent's file, hard-linked (copied where the file system
  cannot link): the weights are shared, byte for byte;
* ``bundle.json`` is the parent's with only ``calibration`` replaced (its drift-monitor
  reference too: the new normals' scores and input statistics).

``OUT/recalibration.json`` records the lineage: the parent (its path or registry version,
its calibration), the images used (count, the SHA-256 over their sorted content hashes, and
the list), the new calibration, the false-positive rate on those normals at the old and the
new threshold, and the gate's decision when one was taken (:func:`decide_recalibration`).
Seconds, not a training run: one forward pass per image. Pure: no MLflow, no registry (the
``recalibrate`` step registers the new bundle, :mod:`recontrast_core.steps.recalibrate`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .bundle import load_detector, read_bundle_meta
from .calibration import Calibration, fit_calibration, input_reference
from .data.manifest import file_sha256
from .errors import UserError
from .filenames import BUNDLE_META_FILE, BUNDLE_WEIGHTS_FILE
from .promotion import Decision, PromotionPolicy, decide_promotion
from .runtime import atomic_write, atomic_write_json, ensure_output_dir

RECALIBRATION_FILE = "recalibration.json"
RECALIBRATION_FORMAT = "recontrast-recalibration/1"
BUNDLE_DIR = "bundle"
# Fewer normal images than this and the new threshold is refused by the gate: the
# quantile of a handful of scores is mostly noise.
DEFAULT_MIN_NORMALS = 20

PathLike = Union[str, os.PathLike]


@dataclass
class Recalibration:
    """What :func:`recalibrate_bundle` did (``to_dict`` is ``recalibration.json``)."""

    bundle_dir: Path
    parent: dict
    calibration: Calibration
    parent_calibration: Calibration
    images: list[dict]
    images_sha256: str
    fpr: float  # on the new normals at the new threshold
    parent_fpr: float  # on the new normals at the parent's threshold
    scores: np.ndarray = field(repr=False)
    seconds: float = 0.0
    decision: Optional[dict] = None

    @property
    def n_images(self) -> int:
        return len(self.images)

    def metrics(self) -> dict[str, float]:
        """The numbers a registry version records (higher is not always better here: these
        are read by people and by the recalibration gate, never compared by the promotion rule)."""
        return {
            "recalibration_fpr": float(self.fpr),
            "recalibration_parent_fpr": float(self.parent_fpr),
            "recalibration_n_normals": float(self.n_images),
            "recalibration_threshold": float(self.calibration.threshold),
            "recalibration_parent_threshold": float(self.parent_calibration.threshold),
        }

    def to_dict(self) -> dict:
        return {
            "format": RECALIBRATION_FORMAT,
            "bundle": str(self.bundle_dir),
            "parent": self.parent,
            "calibration": self.calibration.to_dict(),
            "parent_calibration": self.parent_calibration.to_dict(),
            "n_images": self.n_images,
            "images_sha256": self.images_sha256,
            "fpr": self.fpr,
            "parent_fpr": self.parent_fpr,
            "score_summary": _summary(self.scores),
            "seconds": round(self.seconds, 3),
            "decision": self.decision,
            "images": self.images,
        }


def _summary(scores: np.ndarray) -> dict:
    s = np.asarray(scores, dtype=np.float64)
    return {"min": float(s.min()), "median": float(np.median(s)), "p99": float(np.quantile(s, 0.99)),
            "max": float(s.max())}


def images_digest(paths: Sequence[PathLike]) -> tuple[str, list[dict]]:
    """``(sha256, rows)``: one row ``{"path", "sha256"}`` per image, and the SHA-256 of their
    sorted content hashes (the same images give the same digest wherever they lie)."""
    rows = [{"path": str(p), "sha256": file_sha256(Path(p))} for p in paths]
    h = hashlib.sha256()
    for digest in sorted(r["sha256"] for r in rows):
        h.update(digest.encode())
    return h.hexdigest(), rows


def score_images(detector, paths: Sequence[PathLike], progress: bool = True) -> np.ndarray:
    """Image scores of ``paths`` with a loaded detector (``recontrast predict``'s batches); an
    unreadable image is a :class:`UserError` naming it (a recalibration set must be clean)."""
    from .predict import failed_rows, predict_paths

    rows = predict_paths(detector, paths, overlays=False, progress=progress)
    bad = failed_rows(rows)
    if bad:
        raise UserError(f"{bad[0]['path']}: cannot be read as an image ({bad[0]['error']}); remove it from "
                        "the normal images")
    return np.asarray([float(r["score"]) for r in rows], dtype=np.float64)


def _link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` (same weights, no second copy), else copy it."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        atomic_write(dst, lambda p: shutil.copyfile(src, p))
        return "copy"


def _refuse_parent(out_dir: Path, parent_dir: Path) -> None:
    if out_dir.resolve() == parent_dir.resolve():
        raise UserError(f"{out_dir}: the recalibrated bundle cannot replace its parent; choose another --out")


def write_recalibrated_bundle(parent_dir: PathLike, out_dir: PathLike, calibration: Calibration) -> Path:
    """``out_dir``: the parent bundle's weights (hard link or copy) and its ``bundle.json``
    with ``calibration`` replaced, nothing else changed. Written into a temporary folder and
    renamed into place."""
    parent_dir, out_dir = Path(parent_dir), Path(out_dir)
    meta = read_bundle_meta(parent_dir)
    _refuse_parent(out_dir, parent_dir)
    meta["calibration"] = calibration.to_dict()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _link_or_copy(parent_dir / BUNDLE_WEIGHTS_FILE, tmp / BUNDLE_WEIGHTS_FILE)
        atomic_write_json(tmp / BUNDLE_META_FILE, meta)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def recalibrate_bundle(
    bundle_dir: PathLike,
    normals: Sequence[PathLike],
    out_dir: PathLike,
    *,
    target_fpr: float = 0.01,
    device: str = "auto",
    progress: bool = True,
    parent: Optional[Mapping[str, Any]] = None,
) -> Recalibration:
    """Score ``normals`` (image files) with the bundle, fit the calibration on them
    (normal images only: ``method="fpr"`` at ``target_fpr``) and write ``out_dir/bundle/``
    (shared weights, new calibration) and ``out_dir/recalibration.json``. ``parent``: what
    to record about the bundle's origin (e.g. its registry version); its path by default."""
    t0 = time.perf_counter()
    paths = [Path(p) for p in normals]
    if not paths:
        raise UserError("no normal images given to recalibrate on")
    _refuse_parent(Path(out_dir) / BUNDLE_DIR, Path(bundle_dir))  # before the scoring
    out = ensure_output_dir(out_dir)
    detector = load_detector(bundle_dir, device)
    old = detector.calibration
    scores = score_images(detector, paths, progress)
    try:
        calib = fit_calibration(scores, None, target_fpr=target_fpr)
    except ValueError as exc:
        raise UserError(f"cannot calibrate on these images: {exc}") from None
    # the drift monitor's reference follows the new normals: their scores (fit_calibration
    # records them) and their input statistics
    calib = calib.with_input_reference(input_reference(paths, progress=progress))
    digest, rows = images_digest(paths)
    for row, s in zip(rows, scores):
        row["score"] = float(s)
    bundle = write_recalibrated_bundle(bundle_dir, out / BUNDLE_DIR, calib)
    result = Recalibration(
        bundle_dir=bundle,
        parent={"bundle": str(Path(bundle_dir).resolve()), **dict(parent or {})},
        calibration=calib, parent_calibration=old, images=rows, images_sha256=digest,
        fpr=float(np.mean(scores >= calib.threshold)), parent_fpr=float(np.mean(scores >= old.threshold)),
        scores=scores,
    )
    result.seconds = time.perf_counter() - t0
    write_record(out, result)
    return result


def write_record(out_dir: PathLike, result: Recalibration) -> Path:
    """``out_dir/recalibration.json`` (rewritten when the gate's decision is known)."""
    return atomic_write_json(Path(out_dir) / RECALIBRATION_FILE, result.to_dict())


# ---------------------------------------------------------------------------------------
# the gate: when a recalibrated version may replace the champion
# ---------------------------------------------------------------------------------------
def fpr_bound(target_fpr: float, n: int) -> float:
    """The most a threshold fitted by the ``fpr`` rule lets through on its own calibration
    scores: ``target_fpr + 1/n`` (calibration.py)."""
    return target_fpr + 1.0 / max(1, n)


def decide_recalibration(
    fpr: float,
    n_normals: int,
    target_fpr: float,
    *,
    min_normals: int = DEFAULT_MIN_NORMALS,
    labelled_metrics: Optional[Mapping[str, Any]] = None,
    policy: PromotionPolicy = PromotionPolicy(),
    parent_is_champion: bool = True,
    parent: str = "the parent",
) -> Decision:
    """The recalibration gate. Promote only if

    1. at least ``min_normals`` normal images were used;
    2. the false-positive rate on them at the new threshold is within the rule's bound
       (``target_fpr + 1/n``);
    3. where labelled data were evaluated (``labelled_metrics``), the policy's floors hold
       (the promotion rule's own floors, :func:`~recontrast_core.promotion.decide_promotion`,
       without a champion comparison: the weights are the champion's);
    4. the weights are the champion's (``parent_is_champion``): a recalibrated older version
       is registered but never promoted by this gate.
    """
    if n_normals < min_normals:
        return Decision(False, f"only {n_normals} normal images (the gate needs at least {min_normals})")
    bound = fpr_bound(target_fpr, n_normals)
    if fpr > bound + 1e-12:
        return Decision(False, f"false-positive rate {fpr:.4f} on the {n_normals} normals exceeds "
                               f"{bound:.4f} (target {target_fpr:g} + 1/n)")
    notes = f"FPR {fpr:.4f} on {n_normals} normals (bound {bound:.4f})"
    if labelled_metrics:
        floors_only = policy.policy().model_copy(update={"baseline_floor": False})
        floors = decide_promotion(labelled_metrics, None, floors_only)
        if not floors.promote:
            return Decision(False, f"labelled data: {floors.reason}")
        notes += f"; labelled data: floors pass ({', '.join(f'{k} >= {v:g}' for k, v in sorted(policy.floors.items()))})"
    if not parent_is_champion:
        return Decision(False, f"{notes}; but {parent} is not the champion: register only "
                               "(promote by hand with `recontrast registry promote`)")
    return Decision(True, f"recalibrated {parent}: {notes}")


__all__ = ["BUNDLE_DIR", "DEFAULT_MIN_NORMALS", "RECALIBRATION_FILE", "Recalibration", "decide_recalibration",
           "fpr_bound", "images_digest", "recalibrate_bundle", "score_images", "write_recalibrated_bundle",
           "write_record"]
