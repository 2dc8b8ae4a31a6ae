"""Production threshold and score normalisation (pure numpy at inference time).

The evaluate step fits a :class:`Calibration` on a validation split and stores it with
the model (``to_dict()`` is plain JSON). Serving then reports ``normalise(score)`` in
[0, 1], where 0.5 is exactly the decision threshold, and ``decide(score)``.

Threshold choice (ARCHITECTURE.md, "Metrics"):

* labelled anomalies available: the threshold maximising image F1
  (:func:`recontrast_core.metrics.image_f1_max`), ``method="f1"``;
* normal images only: the ``1 - target_fpr`` quantile of the normal scores, taken
  conservatively with ``np.quantile(..., method="higher")`` (an actual normal score, never
  interpolated below it), ``method="fpr"``. With the rule ``score >= threshold`` the
  false-positive rate on the calibration scores themselves is
  ``(1 + floor(target_fpr * (n - 1))) / n``, i.e. at most ``target_fpr + 1/n``; with
  fewer than ``1 / target_fpr`` normal scores the threshold is simply their maximum.

Normalisation is piecewise linear, so that every number can be explained:

* ``lo`` = the lowest normal score seen at fit time -> 0.0,
* ``threshold`` -> 0.5,
* ``hi = threshold + (threshold - median normal score)`` -> 1.0: a score as far above
  the threshold as the typical normal image is below it;
* linear in between, clipped to [0, 1] outside. Scores may be any real numbers (no
  assumption that they are non-negative).

Fallbacks keep ``lo < threshold < hi`` when the normal scores do not (threshold at or
below the median, all normal scores equal): the spread used is, in order of preference,
``threshold - median``, ``threshold - min``, the normal scores' standard deviation,
``|threshold|``, 1.0 (and never below ``1e-9 * max(1, |threshold|)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np

__all__ = ["Calibration", "CalibrationFieldError", "fit_calibration", "normalise", "decide"]

_METHODS = ("f1", "fpr")
# The largest double below 0.5: a score below the threshold never normalises to 0.5,
# even where rounding in (score - lo) / (threshold - lo) would give exactly 1.
_BELOW_HALF = float(np.nextafter(0.5, 0.0))


class CalibrationFieldError(ValueError):
    """A field of a :class:`Calibration` has a value it cannot have; ``field`` names it."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _finite(name: str, value) -> float:
    if not _is_number(value) or not np.isfinite(float(value)):
        raise CalibrationFieldError(name, f"expected a finite number, got {value!r:.60}")
    return float(value)


def _count(name: str, value) -> int:
    whole = _is_number(value) and (isinstance(value, (int, np.integer)) or
                                   (np.isfinite(float(value)) and float(value).is_integer()))
    if not whole or value < 0:
        raise CalibrationFieldError(name, f"expected a whole number >= 0, got {value!r:.60}")
    return int(value)


@dataclass
class Calibration:
    """A fitted decision threshold and the piecewise-linear map to [0, 1].

    ``lo -> 0``, ``threshold -> 0.5``, ``hi -> 1``; ``lo < threshold < hi``.
    ``method`` is ``"f1"`` (labelled anomalies) or ``"fpr"`` (normal scores only, with
    ``target_fpr``). ``n_normal`` / ``n_anomalous`` are the calibration-set sizes.
    """

    threshold: float
    lo: float
    hi: float
    method: str
    target_fpr: Optional[float]
    n_normal: int
    n_anomalous: int

    def __post_init__(self) -> None:
        # Checked field by field (values come from bundle.json): a ValueError naming the
        # field, never an OverflowError (n_normal: 1e400) or a TypeError.
        self.threshold = _finite("threshold", self.threshold)
        self.lo = _finite("lo", self.lo)
        self.hi = _finite("hi", self.hi)
        self.n_normal = _count("n_normal", self.n_normal)
        self.n_anomalous = _count("n_anomalous", self.n_anomalous)
        if self.target_fpr is not None:
            self.target_fpr = _finite("target_fpr", self.target_fpr)
            if not 0.0 < self.target_fpr < 1.0:
                raise CalibrationFieldError("target_fpr", f"expected a number in (0, 1), got {self.target_fpr!r}")
        if not isinstance(self.method, str) or self.method not in _METHODS:
            raise ValueError(f"Calibration.method must be one of {_METHODS}, got {self.method!r}")
        if not all(np.isfinite([self.lo, self.threshold, self.hi])):
            raise ValueError("Calibration: lo, threshold and hi must be finite")
        if not self.lo < self.threshold < self.hi:
            raise ValueError(
                f"Calibration: need lo < threshold < hi, got {self.lo} / {self.threshold} / {self.hi}"
            )

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        unknown = set(data) - names
        if missing or unknown:
            raise ValueError(
                f"Calibration.from_dict: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
            )
        return cls(**{k: data[k] for k in names})


def _as_scores(scores, name: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError(f"{name}: scores contain NaN")
    return s


def _spread(threshold: float, normal: np.ndarray) -> float:
    floor = 1e-9 * max(1.0, abs(threshold))
    candidates = (
        threshold - float(np.median(normal)),
        threshold - float(normal.min()),
        float(normal.std()),
        abs(threshold),
        1.0,
    )
    for c in candidates:
        if c > 0 and np.isfinite(c):
            return max(c, floor)
    return max(1.0, floor)  # pragma: no cover - 1.0 above always qualifies


def fit_calibration(normal_scores, anomalous_scores=None, target_fpr: float = 0.01) -> Calibration:
    """Fit the production threshold and normalisation on validation image scores.

    With anomalous scores (non-empty): F1-max threshold, ``method="f1"``,
    ``target_fpr=None``. Without: ``np.quantile(normal, 1 - target_fpr, method="higher")``,
    ``method="fpr"``. ValueError if there are no normal scores, a score is not finite, or
    ``target_fpr`` is not in (0, 1).
    """
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    if normal.size == 0:
        raise ValueError("fit_calibration needs scores of normal validation images; got none")
    if not np.all(np.isfinite(normal)):
        raise ValueError("fit_calibration: normal scores contain NaN or infinite values")
    anomalous = (
        np.empty(0) if anomalous_scores is None else np.asarray(anomalous_scores, dtype=np.float64).ravel()
    )
    if not np.all(np.isfinite(anomalous)):
        raise ValueError("fit_calibration: anomalous scores contain NaN or infinite values")

    if anomalous.size > 0:
        from recontrast_core.metrics import image_f1_max

        labels = np.concatenate([np.zeros(normal.size, bool), np.ones(anomalous.size, bool)])
        _, threshold = image_f1_max(labels, np.concatenate([normal, anomalous]))
        method, fpr = "f1", None
    else:
        if not 0.0 < target_fpr < 1.0:
            raise ValueError(f"fit_calibration: target_fpr must be in (0, 1), got {target_fpr}")
        threshold = float(np.quantile(normal, 1.0 - target_fpr, method="higher"))
        method, fpr = "fpr", float(target_fpr)

    spread = _spread(threshold, normal)
    lo = float(normal.min())
    if not threshold - lo > 0 or threshold - lo < 1e-9 * max(1.0, abs(threshold)):
        lo = threshold - spread
    hi = threshold + spread
    return Calibration(
        threshold=threshold,
        lo=lo,
        hi=hi,
        method=method,
        target_fpr=fpr,
        n_normal=int(normal.size),
        n_anomalous=int(anomalous.size),
    )


def normalise(scores, calib: Calibration) -> np.ndarray:
    """Map scores monotonically to [0, 1] with ``calib.threshold`` exactly at 0.5.

    Piecewise linear: ``[lo, threshold] -> [0, 0.5]``, ``[threshold, hi] -> [0.5, 1]``,
    clipped outside. ``normalise(s) >= 0.5`` if and only if ``decide(s)``. Returns float64
    of the input's shape. ValueError on NaN.
    """
    s = _as_scores(scores, "normalise")
    t, lo, hi = calib.threshold, calib.lo, calib.hi
    with np.errstate(invalid="ignore", over="ignore"):
        below = np.minimum(0.5 * ((s - lo) / (t - lo)), _BELOW_HALF)
        above = 0.5 + 0.5 * ((s - t) / (hi - t))
    out = np.where(s >= t, above, below)
    return np.clip(out, 0.0, 1.0)


def decide(scores, calib: Calibration) -> np.ndarray:
    """Anomalous when ``score >= calib.threshold``. Boolean array of the input's shape."""
    return _as_scores(scores, "decide") >= calib.threshold
