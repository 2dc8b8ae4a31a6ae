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

The reference (``Calibration.reference``, optional; the drift monitor's baseline,
:mod:`recontrast_core.monitor`, docs/operations.md): what the normal population looked
like when the calibration was fitted.

* ``scores``: the normal scores the threshold was fitted on, sorted (at most
  :data:`REFERENCE_MAX_SCORES`; more are kept as that many + 1 evenly spaced quantiles),
  with ``n_scores`` their true count. :func:`fit_calibration` always records them.
* ``input`` (when the training images were at hand): simple statistics of the normal
  training images, one value per image, kept as :data:`INPUT_QUANTILES` quantiles (0 %,
  1 %, ..., 100 %) each: ``brightness`` (mean grey level, 0..255, of the decoded image at
  its own size; grey = ITU-R 601 luma of the RGB the model reads), ``contrast`` (the
  standard deviation of those grey levels), ``width`` and ``height`` (pixels); with
  ``n_images`` (at most :data:`REFERENCE_MAX_IMAGES`, evenly spaced over the training set).
  :func:`input_reference` computes it; :func:`image_statistics` is the per-image measure
  the monitor applies to new images.

Bundles written before the reference existed have none and load as before; every number
of a reference is checked on load like the other fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["Calibration", "CalibrationFieldError", "fit_calibration", "normalise", "decide", "image_statistics",
           "input_reference", "score_reference", "INPUT_STATS"]

_METHODS = ("f1", "fpr")
# The largest double below 0.5: a score below the threshold never normalises to 0.5,
# even where rounding in (score - lo) / (threshold - lo) would give exactly 1.
_BELOW_HALF = float(np.nextafter(0.5, 0.0))

REFERENCE_MAX_SCORES = 1000  # normal scores kept as they are; more become 1001 quantiles
REFERENCE_MAX_IMAGES = 1000  # training images measured for the input reference (evenly spaced)
INPUT_QUANTILES = 101  # 0 %, 1 %, ..., 100 % of each input statistic
INPUT_STATS = ("brightness", "contrast", "width", "height")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


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
    reference: Optional[dict] = None

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
        if self.reference is not None:
            self.reference = check_reference(self.reference)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (``reference`` only when there is one: the old shape otherwise)."""
        out = asdict(self)
        if out["reference"] is None:
            del out["reference"]
        return out

    def with_input_reference(self, input_ref: Optional[dict]) -> "Calibration":
        """A copy whose reference also holds ``input_ref`` (:func:`input_reference`); None: unchanged."""
        if input_ref is None:
            return self
        return replace(self, reference={**(self.reference or {}), "input": input_ref})

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        if not isinstance(data, dict):
            raise ValueError(f"Calibration.from_dict: expected an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        missing = names - set(data) - {"reference"}  # bundles older than the reference have none
        unknown = set(data) - names
        if missing or unknown:
            raise ValueError(
                f"Calibration.from_dict: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
            )
        return cls(**{k: data[k] for k in names if k in data})


# ----------------------------------------------------------------------------- the reference
def _sorted_numbers(field: str, value: Any, *, length: Optional[int] = None, lowest: Optional[float] = None) -> list:
    if not isinstance(value, list) or not value or (length is not None and len(value) != length):
        want = f"a list of {length} numbers" if length else "a non-empty list of numbers"
        raise CalibrationFieldError(field, f"expected {want}, got {str(value)[:60]}")
    out = [_finite(field, v) for v in value]
    if any(b < a for a, b in zip(out, out[1:])):
        raise CalibrationFieldError(field, "expected numbers in ascending order")
    if lowest is not None and out[0] < lowest:
        raise CalibrationFieldError(field, f"expected numbers >= {lowest:g}, got {out[0]!r}")
    return out


def check_reference(ref: Any) -> dict:
    """The reference with every number checked (finite, sorted, counts whole): a
    :class:`CalibrationFieldError` naming the field (``reference.input.brightness``) otherwise."""
    if not isinstance(ref, dict):
        raise CalibrationFieldError("reference", f"expected an object, got {type(ref).__name__}")
    unknown = set(ref) - {"scores", "n_scores", "input"}
    if unknown:
        raise CalibrationFieldError("reference", f"unknown keys {sorted(unknown)}")
    out: dict = {}
    if "scores" in ref or "n_scores" in ref:
        scores = _sorted_numbers("reference.scores", ref.get("scores"))
        if len(scores) > REFERENCE_MAX_SCORES + 1:
            raise CalibrationFieldError("reference.scores", f"expected at most {REFERENCE_MAX_SCORES + 1} numbers")
        n = _count("reference.n_scores", ref.get("n_scores"))
        if n < min(len(scores), REFERENCE_MAX_SCORES + 1):  # more than the maximum: kept as quantiles
            raise CalibrationFieldError("reference.n_scores", f"expected at least {len(scores)}, got {n}")
        out.update(scores=scores, n_scores=n)
    if "input" in ref:
        block = ref["input"]
        if not isinstance(block, dict):
            raise CalibrationFieldError("reference.input", f"expected an object, got {type(block).__name__}")
        unknown = set(block) - {"n_images", *INPUT_STATS}
        if unknown:
            raise CalibrationFieldError("reference.input", f"unknown keys {sorted(unknown)}")
        n = _count("reference.input.n_images", block.get("n_images"))
        if n < 1:
            raise CalibrationFieldError("reference.input.n_images", "expected at least 1")
        item: dict = {"n_images": n}
        for stat in INPUT_STATS:
            if stat in block:
                item[stat] = _sorted_numbers(f"reference.input.{stat}", block[stat], length=INPUT_QUANTILES,
                                             lowest=1.0 if stat in ("width", "height") else 0.0)
        out["input"] = item
    if not out:
        raise CalibrationFieldError("reference", "expected scores, input or both")
    return out


def score_reference(normal_scores) -> dict:
    """``{"scores", "n_scores"}`` of the normal scores (module doc)."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size > REFERENCE_MAX_SCORES:
        s = np.quantile(s, np.linspace(0.0, 1.0, REFERENCE_MAX_SCORES + 1))
    return {"scores": [float(x) for x in s], "n_scores": int(np.asarray(normal_scores).size)}


def image_statistics(rgb: np.ndarray) -> tuple[float, float, int, int]:
    """``uint8 [H, W, 3]`` (or [H, W]) -> (brightness, contrast, width, height): the mean
    and standard deviation of the grey levels (ITU-R 601 luma, 0..255) and the size."""
    a = np.asarray(rgb)
    if a.ndim == 3 and a.shape[2] >= 3:
        grey = a[..., :3].astype(np.float32) @ _LUMA
    else:
        grey = a.reshape(a.shape[0], a.shape[1]).astype(np.float32) if a.ndim == 3 else a.astype(np.float32)
    return float(grey.mean(dtype=np.float64)), float(grey.std(dtype=np.float64)), int(a.shape[1]), int(a.shape[0])


def summarise_inputs(stats) -> dict:
    """Per-image ``(brightness, contrast, width, height)`` rows -> the ``input`` reference."""
    a = np.asarray(stats, dtype=np.float64).reshape(-1, len(INPUT_STATS))
    if a.shape[0] == 0:
        raise ValueError("summarise_inputs: no images")
    levels = np.linspace(0.0, 1.0, INPUT_QUANTILES)
    out: dict = {"n_images": int(a.shape[0])}
    for j, name in enumerate(INPUT_STATS):
        out[name] = [round(float(q), 6) for q in np.quantile(a[:, j], levels)]
    return out


def input_reference(sources: Sequence, progress: bool = False,
                    max_images: int = REFERENCE_MAX_IMAGES) -> Optional[dict]:
    """The ``input`` reference of the training images ``sources`` (paths, or a manifest's
    :meth:`~recontrast_core.data.manifest.Manifest.source` values): each image decoded as
    training decodes it and measured (:func:`image_statistics`); at most ``max_images``,
    evenly spaced. An image that cannot be read is left out (training has read them all);
    None when none could be read."""
    from .data.annotations import load_source_image
    from .progress import track_steps

    sources = list(sources)
    if len(sources) > max_images:
        sources = [sources[i] for i in np.linspace(0, len(sources) - 1, max_images).round().astype(int)]
    rows = []
    with track_steps("input reference", len(sources), enabled=progress) as bar:
        for src in sources:
            try:
                rows.append(image_statistics(load_source_image(src)))
            except Exception:  # noqa: BLE001 - a monitoring extra never fails a training
                pass
            bar.advance(1)
    return summarise_inputs(rows) if rows else None


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


def fit_calibration(normal_scores, anomalous_scores=None, target_fpr: float = 0.01,
                    input_ref: Optional[dict] = None) -> Calibration:
    """Fit the production threshold and normalisation on validation image scores.

    With anomalous scores (non-empty): F1-max threshold, ``method="f1"``,
    ``target_fpr=None``. Without: ``np.quantile(normal, 1 - target_fpr, method="higher")``,
    ``method="fpr"``. ValueError if there are no normal scores, a score is not finite, or
    ``target_fpr`` is not in (0, 1). The normal scores become the reference's ``scores``;
    ``input_ref`` (:func:`input_reference`), when given, its ``input``.
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
        reference={**score_reference(normal), **({"input": input_ref} if input_ref else {})},
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
