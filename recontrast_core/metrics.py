"""Evaluation metrics for anomaly detection: image and pixel level.

Pure numpy/scipy/sklearn; callers pass numpy arrays (never tensors).

Conventions used throughout:

* A higher score means "more anomalous". An image or pixel is predicted anomalous at
  threshold ``t`` when ``score >= t``.
* ``labels`` are image labels, 0 = normal and 1 = anomalous (bool accepted).
* ``masks`` are ground-truth pixel masks, either one array ``[N, H, W]`` or a list of
  ``[H, W]`` arrays (images may differ in size), with values in {0, 1} (or bool).
  Resized masks must be binarised by the caller: anything else is rejected.
* ``maps`` are anomaly maps of the same shapes as ``masks``.

Metric names follow ARCHITECTURE.md ("Metrics"):

* :func:`image_auroc`, :func:`pixel_auroc` (all pixels of all images pooled),
* :func:`aupro`: the standard MVTec AD dataset-level per-region-overlap curve, integrated
  up to an FPR limit (0.3) and normalised by that limit,
* :func:`aupro_per_image`: the ReContrast / RD4AD repository variant, for paper parity,
* :func:`image_f1_max` and the threshold achieving it,
* :func:`compute_all`: all of the above in one dict,
* :func:`paired_bootstrap_delta`: the paired bootstrap interval of the difference between
  two score sets on the same images (a model against the training-free baseline).

Functions raise ``ValueError`` with a readable message for invalid or degenerate input.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

# The metric names, declared once (compute_all's keys; promotion, selection and the CLI read these)
IMAGE_METRICS = ("image_auroc", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro", "aupro_per_image")
KEY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")  # what the registry tags and compares
RANK_METRICS = ("image_auroc", "pixel_auroc", "aupro")  # what model selection reports per candidate
REPORTED_METRICS = ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image", "image_f1_max")  # CLI comparison

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]

#: 8-connectivity for 2-D ground-truth regions, as in MVTec's official evaluation code
#: (and as skimage.measure.label's default for 2-D images, used by the ReContrast code).
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)

# Positive scores are searched against the sorted negatives in chunks of this many
# values, so temporary index arrays stay small whatever the anomalous area.
_CHUNK = 1 << 20

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "aupro_per_image",
    "image_f1_max",
    "compute_all",
    "paired_bootstrap_delta",
]


# --------------------------------------------------------------------------- validation


def _check_image_level(labels, scores, name: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"{name}: labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{name}: {y.size} labels but {s.size} scores")
    if y.size == 0:
        raise ValueError(f"{name}: no images given")
    if y.dtype != bool:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{name}: labels must be 0 (normal) or 1 (anomalous)")
        y = y != 0
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"{name}: scores must be real numbers, got dtype {s.dtype}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name}: scores contain NaN or infinite values")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous" if n_pos else "normal"
        raise ValueError(
            f"{name} needs both normal (0) and anomalous (1) images; all {y.size} are {only}"
        )
    return y, s


def _image_pairs(masks: ArrayOrList, maps: ArrayOrList, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate masks/maps and return per-image (bool mask, map) pairs (views, no copies)."""
    if masks is None or maps is None:
        raise ValueError(f"{name}: both masks and maps are required")
    if isinstance(masks, np.ndarray) and masks.ndim != 3:
        raise ValueError(f"{name}: masks must be [N, H, W] or a list of [H, W], got shape {masks.shape}")
    if isinstance(maps, np.ndarray) and maps.ndim != 3:
        raise ValueError(f"{name}: maps must be [N, H, W] or a list of [H, W], got shape {maps.shape}")
    if len(masks) != len(maps):
        raise ValueError(f"{name}: {len(masks)} masks but {len(maps)} maps")
    if len(masks) == 0:
        raise ValueError(f"{name}: no images given")
    pairs = []
    for i, (m, a) in enumerate(zip(masks, maps)):
        m = np.asarray(m)
        a = np.asarray(a)
        if m.ndim != 2 or a.shape != m.shape:
            raise ValueError(
                f"{name}: image {i}: mask shape {m.shape} and map shape {a.shape} must be equal and 2-D"
            )
        if m.dtype != bool:
            if not np.all((m == 0) | (m == 1)):
                raise ValueError(f"{name}: image {i}: mask values must be 0/1 or bool (binarise resized masks)")
            m = m != 0
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise ValueError(f"{name}: image {i}: map must hold real numbers, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: image {i}: map contains NaN or infinite values")
        pairs.append((m, a))
    return pairs


def _score_dtype(pairs) -> np.dtype:
    # Keep the callers' precision (float32 maps stay float32: 4 bytes per pixel). Casting
    # float64 down would merge distinct scores into ties and change the exact results.
    dt = np.result_type(*[a.dtype for _, a in pairs])
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def _split_scores(pairs) -> tuple[np.ndarray, np.ndarray]:
    """All normal-pixel scores and all anomalous-pixel scores, each in one preallocated array."""
    n_pos = sum(int(m.sum()) for m, _ in pairs)
    n_tot = sum(m.size for m, _ in pairs)
    dt = _score_dtype(pairs)
    neg = np.empty(n_tot - n_pos, dtype=dt)
    pos = np.empty(n_pos, dtype=dt)
    i = j = 0
    for m, a in pairs:
        k = int(m.sum())
        pos[j : j + k] = a[m]
        neg[i : i + m.size - k] = a[~m]
        j += k
        i += m.size - k
    return neg, pos


# --------------------------------------------------------------------------- image level


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores against image labels (sklearn)."""
    from sklearn.metrics import roc_auc_score

    y, s = _check_image_level(labels, scores, "image_auroc")
    return float(roc_auc_score(y, s))


def image_f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold achieving it.

    Candidate thresholds are sklearn's ``precision_recall_curve`` thresholds (every
    distinct score down to the one reaching full recall; lower thresholds cannot do
    better). An image is predicted anomalous when ``score >= threshold``. Where several
    thresholds reach the same best F1 the lowest of them is returned.
    """
    from sklearn.metrics import precision_recall_curve

    y, s = _check_image_level(labels, scores, "image_f1_max")
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(masks: ArrayOrList, maps: ArrayOrList) -> float:
    """ROC AUC over all pixels of all images pooled together. Exact.

    Computed as the Mann-Whitney statistic: the probability that an anomalous pixel
    scores higher than a normal one, ties counting one half. Equal to sklearn's
    ``roc_auc_score`` on the flattened arrays, but it only copies the scores once (in
    the maps' dtype) and sorts the normal pixels, instead of sklearn's several float64
    arrays the size of the data (~400 images of 256x256 = 26M pixels).
    """
    pairs = _image_pairs(masks, maps, "pixel_auroc")
    neg, pos = _split_scores(pairs)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            "pixel_auroc needs both normal and anomalous pixels; "
            f"got {pos.size} anomalous and {neg.size} normal"
        )
    neg.sort()
    pos.sort()  # sorted needles make searchsorted faster
    total = 0  # Python int: sum of 2 * (#neg < p + 0.5 * #neg == p), no overflow
    for start in range(0, pos.size, _CHUNK):
        chunk = pos[start : start + _CHUNK]
        total += int(np.searchsorted(neg, chunk, side="left").sum(dtype=np.int64))
        total += int(np.searchsorted(neg, chunk, side="right").sum(dtype=np.int64))
    return total / (2 * pos.size * neg.size)


def _region_scores(pairs):
    """Normal-pixel scores, anomalous-pixel scores with their PRO weights, region count.

    Each anomalous pixel carries weight 1 / (size of its connected region), so summing the
    weights of the pixels above a threshold gives the sum of the regions' overlaps.
    """
    from scipy import ndimage

    neg, pos = _split_scores(pairs)
    weights = np.empty(pos.size, dtype=np.float64)
    n_regions = 0
    j = 0
    for m, _ in pairs:
        if not m.any():
            continue
        labeled, n = ndimage.label(m, structure=_REGION_STRUCTURE)
        lab = labeled[m]  # same pixel order as a[m] in _split_scores
        sizes = np.bincount(lab, minlength=n + 1)
        weights[j : j + lab.size] = 1.0 / sizes[lab]
        j += lab.size
        n_regions += n
    return neg, pos, weights, n_regions


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x nondecreasing, x[0] <= x_max) on [x[0], x_max].

    If ``x_max`` falls strictly between two points, y is interpolated linearly there
    (the same rule as MVTec's ``trapezoid(x, y, x_max)``).
    """
    ins = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:ins], y[:ins]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) * 0.5))
    if ins < x.size and xs[-1] < x_max:
        x0, y0, x1, y1 = x[ins - 1], y[ins - 1], x[ins], y[ins]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float((x_max - x0) * (y0 + y_at) * 0.5)
    return area


def _pro_curve(masks, maps, num_thresholds=None, name="aupro") -> tuple[np.ndarray, np.ndarray]:
    """The dataset-level (FPR, PRO) curve, from (0, 0) to (1, 1), FPR nondecreasing."""
    pairs = _image_pairs(masks, maps, name)
    neg, pos, weights, n_regions = _region_scores(pairs)
    if n_regions == 0:
        raise ValueError(f"{name} needs at least one anomalous region in the masks; none found")
    if neg.size == 0:
        raise ValueError(f"{name} needs normal pixels to measure false positives; none found")
    n_ok = neg.size
    neg.sort()
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    csum = np.concatenate(([0.0], np.cumsum(weights[order])))
    del order, weights

    def fpr(t, side):  # fraction of normal pixels with score >= t (side="left") / > t ("right")
        return (n_ok - np.searchsorted(neg, t, side=side)) / n_ok

    def pro(t, side):  # mean overlap over all regions at score >= t / > t
        return np.minimum((csum[-1] - csum[np.searchsorted(pos, t, side=side)]) / n_regions, 1.0)

    if num_thresholds is None:
        # Exact curve. The PRO only changes at anomalous-pixel scores u. Between two
        # consecutive such scores the curve is a horizontal run (only the FPR grows),
        # so two points per u describe it exactly: just above u (score > u), and at u
        # (score >= u; normal pixels tied with u make this a sloped segment, as in
        # MVTec's tie handling, which keeps one point per distinct score).
        u = np.unique(pos)[::-1]
        x = np.empty(2 * u.size + 2)
        y = np.empty(2 * u.size + 2)
        x[1:-1:2], y[1:-1:2] = fpr(u, "right"), pro(u, "right")
        x[2:-1:2], y[2:-1:2] = fpr(u, "left"), pro(u, "left")
    else:
        if int(num_thresholds) != num_thresholds or num_thresholds < 2:
            raise ValueError(f"{name}: num_thresholds must be None (exact) or an integer >= 2")
        lo = min(neg[0], pos[0])
        hi = max(neg[-1], pos[-1])
        t = np.linspace(float(lo), float(hi), int(num_thresholds))[::-1]
        x = np.empty(t.size + 2)
        y = np.empty(t.size + 2)
        x[1:-1], y[1:-1] = fpr(t, "left"), pro(t, "left")
    x[0], y[0], x[-1], y[-1] = 0.0, 0.0, 1.0, 1.0
    return x, y


def aupro(masks: ArrayOrList, maps: ArrayOrList, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap curve (MVTec AD definition).

    Ground-truth regions are the 8-connected components of each mask. At a threshold
    ``t``, PRO is the mean over **all regions of all images** of the fraction of the
    region's pixels with ``score >= t``; FPR is the fraction of **all normal pixels of
    all images** (normal images included) with ``score >= t``. The (FPR, PRO) curve
    runs from (0, 0) to (1, 1); its trapezoid area on ``[0, fpr_limit]`` (the curve
    interpolated linearly at ``fpr_limit``) is divided by ``fpr_limit``, so a perfect
    detector gets 1.0.

    ``num_thresholds=None`` (default) computes the exact curve at every distinct score,
    the way MVTec's ``compute_pro`` does: the scores are sorted once and the per-region
    increments accumulated. An integer instead evaluates that many thresholds spaced
    linearly between the smallest and largest score (an approximation; faster only for
    repeated calls on the same data, kept for comparison with binned implementations).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    x, y = _pro_curve(masks, maps, num_thresholds, "aupro")
    return _area_up_to(x, y, fpr_limit) / fpr_limit


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))


def _aupro_one_image(mask: np.ndarray, amap: np.ndarray, fpr_limit: float, num_thresholds: int) -> float:
    from scipy import ndimage

    labeled, n = ndimage.label(mask, structure=_REGION_STRUCTURE)
    neg = np.sort(amap[~mask])
    n_ok = neg.size
    min_th, max_th = amap.min(), amap.max()
    delta = (max_th - min_th) / num_thresholds
    if not delta > 0:
        return 0.0  # constant map: nothing is ever above a threshold, PRO stays 0
    ths = np.arange(min_th, max_th, delta)  # as the reference code (binarise: amap > th)
    fprs = (n_ok - np.searchsorted(neg, ths, side="right")) / n_ok
    # Anomalous pixels sorted by (region, score): each region's scores are one sorted run.
    lab = labeled[mask]
    vals = amap[mask]
    order = np.lexsort((vals, lab))
    lab, vals = lab[order], vals[order]
    bounds = np.searchsorted(lab, np.arange(1, n + 2))
    pros = np.zeros(ths.size, dtype=np.float64)
    for r in range(n):
        s = vals[bounds[r] : bounds[r + 1]]
        pros += (s.size - np.searchsorted(s, ths, side="right")) / s.size
    pros /= n

    keep = fprs < fpr_limit  # strict, as the reference code
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size == 0:
        return 0.0
    fmax = fprs.max()
    if fmax == 0:
        # Degenerate curve (every kept point at FPR 0; the reference code divides by 0):
        # the curve is flat at the best PRO reached without any false positive.
        return float(pros.max())
    # Points are in increasing threshold order, i.e. decreasing FPR (sklearn's auc
    # detects that direction and flips the sign; we do the same).
    return -_trapezoid(fprs / fmax, pros)


def aupro_per_image(
    masks: ArrayOrList, maps: ArrayOrList, fpr_limit: float = 0.3, num_thresholds: int = 200
) -> float:
    """ReContrast / RD4AD repository AUPRO: the paper-parity variant. Not MVTec's AUPRO.

    Reproduces ``compute_pro`` of the ReContrast (and RD4AD) ``utils.py`` as their
    ``evaluation`` calls it: once **per anomalous test image**, then the mean over those
    images. Per image:

    * thresholds ``np.arange(min, max, (max - min) / num_thresholds)`` over that image's
      map; a pixel is positive when ``score > threshold`` (strict);
    * PRO = mean over the image's regions (8-connected, skimage's default) of the
      fraction of region pixels that are positive; FPR = positive normal pixels over
      the image's normal pixels;
    * points with ``FPR < fpr_limit`` (strict) are kept, their FPR divided by the
      largest kept FPR (so the range is rescaled to [0, 1], not divided by the limit),
      and the trapezoid area (sklearn ``auc``) is the image's value.

    Normal images (empty masks) are not used at all, unlike :func:`aupro`, where their
    pixels count as false positives. Implemented with sorting and ``searchsorted`` instead
    of full-array comparisons per threshold; the results are the same.

    Degenerate cases where the reference code crashes or returns NaN are defined here:
    a constant map scores 0; when no point is kept, 0; when every kept point has FPR 0,
    the largest kept PRO. Images whose mask covers every pixel (no FPR defined) are
    skipped. ValueError if no image has both anomalous and normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro_per_image: fpr_limit must be in (0, 1], got {fpr_limit}")
    if int(num_thresholds) != num_thresholds or num_thresholds < 1:
        raise ValueError("aupro_per_image: num_thresholds must be a positive integer")
    pairs = _image_pairs(masks, maps, "aupro_per_image")
    values = [
        _aupro_one_image(m, a, fpr_limit, int(num_thresholds)) for m, a in pairs if m.any() and not m.all()
    ]
    if not values:
        raise ValueError("aupro_per_image needs at least one image with both anomalous and normal pixels")
    return float(np.mean(values))


# --------------------------------------------------------------------------- all at once


def compute_all(labels, scores, masks: ArrayOrList | None = None, maps: ArrayOrList | None = None) -> dict:
    """All metrics as a flat dict of floats (the evaluate step's metrics JSON).

    Keys: ``image_auroc``, ``image_f1_max``, ``image_f1_threshold``; with masks also
    ``pixel_auroc``, ``aupro``, ``aupro_per_image``. Pixel keys are omitted when no masks
    are given, or when the masks hold no anomalous pixel at all (a dataset with image
    labels only): there is no pixel-level ground truth to score against.
    """
    out: dict[str, float] = {"image_auroc": image_auroc(labels, scores)}
    f1, thr = image_f1_max(labels, scores)
    out["image_f1_max"] = f1
    out["image_f1_threshold"] = thr
    if masks is None:
        return out
    if maps is None:
        raise ValueError("compute_all: masks were given without anomaly maps")
    pairs = _image_pairs(masks, maps, "compute_all")
    if not any(m.any() for m, _ in pairs):
        return out
    masks_ = [m for m, _ in pairs]
    maps_ = [a for _, a in pairs]
    out["pixel_auroc"] = pixel_auroc(masks_, maps_)
    out["aupro"] = aupro(masks_, maps_)
    out["aupro_per_image"] = aupro_per_image(masks_, maps_)
    return out



# --------------------------------------------------------------------------- comparison

# Rows of bootstrap replicates ranked at once, so the [rows, n] float64 matrices stay near
# 32 MB whatever the number of images.
_BOOT_CELLS = 1 << 22


def _auroc_rows(scores: np.ndarray, n_pos: int) -> np.ndarray:
    """AUROC of every row of ``scores`` [B, n] whose first ``n_pos`` columns are the
    anomalous images: the Mann-Whitney statistic from average ranks (ties count one half),
    equal to sklearn's ``roc_auc_score`` row by row."""
    from scipy.stats import rankdata

    n_neg = scores.shape[1] - n_pos
    ranks = rankdata(scores, axis=1)
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def paired_bootstrap_delta(
    labels,
    scores_a,
    scores_b,
    metric=image_auroc,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """``metric(a) - metric(b)`` on the same images and its paired bootstrap interval.

    Each of the ``n_boot`` replicates resamples the images with replacement, the same
    images for both score arrays (paired), stratified by label: the anomalous and the
    normal images are resampled separately, so every replicate keeps the data's class
    counts (and both classes). The interval is the percentile interval of the replicate
    differences at level ``confidence``. ``metric(labels, scores)`` returns a float (a
    tuple's first element is used, e.g. :func:`image_f1_max`); :func:`image_auroc` (the
    default) is computed for all replicates at once from ranks.

    Returns ``{"delta", "lo", "hi", "n_boot", "confidence"}``; ``delta`` is the metric
    difference on the data itself. Deterministic for a given ``seed``.
    """
    y, a = _check_image_level(labels, scores_a, "paired_bootstrap_delta")
    _, b = _check_image_level(labels, scores_b, "paired_bootstrap_delta")
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"paired_bootstrap_delta: n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap_delta: confidence must be in (0, 1), got {confidence!r}")
    n_boot = int(n_boot)

    def value(yy, ss) -> float:
        out = metric(yy, ss)
        return float(out[0] if isinstance(out, tuple) else out)

    delta = value(y, a) - value(y, b)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    # [n_boot, n]: anomalous images first, then normal ones, in every row.
    idx = np.concatenate(
        [pos[rng.integers(0, pos.size, (n_boot, pos.size))], neg[rng.integers(0, neg.size, (n_boot, neg.size))]],
        axis=1,
    )
    if metric is image_auroc:
        deltas = np.empty(n_boot, dtype=np.float64)
        rows = max(1, _BOOT_CELLS // idx.shape[1])
        for start in range(0, n_boot, rows):
            block = idx[start : start + rows]
            deltas[start : start + rows] = _auroc_rows(a[block], pos.size) - _auroc_rows(b[block], pos.size)
    else:
        yb = np.concatenate([np.ones(pos.size, dtype=bool), np.zeros(neg.size, dtype=bool)])
        deltas = np.array([value(yb, a[row]) - value(yb, b[row]) for row in idx], dtype=np.float64)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(deltas, [tail, 1.0 - tail])
    return {"delta": float(delta), "lo": float(lo), "hi": float(hi), "n_boot": n_boot, "confidence": float(confidence)}
