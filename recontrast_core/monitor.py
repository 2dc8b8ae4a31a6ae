"""Drift of a deployed model: its scores (and, where the images are at hand, their simple
statistics) in windows of production traffic, against the reference its calibration
stored (:mod:`recontrast_core.calibration`, ``Calibration.reference``). Pure numpy; the
adapters (score tables, MLflow, KFP) are :mod:`recontrast_core.mlops.monitoring`.
docs/operations.md ("Monitor", "Verdicts") is the user's page.

Per window (:func:`judge_window`):

* **alarm rate**: flagged images / scored images, with a Wilson score interval
  (:func:`wilson_interval`, two-sided, ``confidence``), against the *expected* alarm rate
  of the stored threshold on normal images: ``k / (n + 1)``, where ``k`` of the ``n``
  reference normals are at or above the threshold (the expected exceedance of an order
  statistic: with 51 held-out normals and the maximum as threshold that is 1/52, about
  1.9 %, not the 1 % asked for). Without a reference: ``target_fpr`` (or 1 %).
  ``high`` when the interval's lower end is above it **and** the count is improbable for
  normal images (:func:`alarm_p_value` < ``alpha``: beta-binomial, so that the threshold's own
  uncertainty, one order statistic of a few dozen reference normals, is counted; binomial at
  the expected rate without a reference).
* **scores**: a two-sample Kolmogorov-Smirnov test (:func:`ks_two_sample`: p from the
  asymptotic Kolmogorov distribution, ``scipy.stats.kstwobign``, at ``sqrt(nm/(n+m)) D``;
  conservative in small samples) and the population stability
  index (:func:`psi`, reference-decile bins) of the *normalised* scores against the
  reference's normalised scores. Twice: over all scores (reported), and over the scores
  below the threshold against the reference's below the threshold (**the one the verdict
  reads**): defects add scores above the threshold, which the alarm rate reports; drift of
  the normal population moves the scores below it too, whatever the defect rate.
* **input** (when images are given): the same KS + PSI for brightness, contrast, width and
  height (:func:`recontrast_core.calibration.image_statistics`) against the training
  images' quantiles.

A test's level: ``major`` when ``p < alpha`` and ``PSI >= psi_major``; ``moderate`` when
``p < alpha`` and ``PSI >= psi_moderate``; else ``none`` (a shift too small to matter, or
not shown at this window size: both gates are needed, KS alone flags negligible shifts in
big windows, PSI alone is noisy in small ones).

Verdict (:func:`verdict_of`): ``retrain`` when the scores below the threshold or an input
statistic drifted ``major``; ``watch`` when one drifted ``moderate`` or the alarm rate is
high; else ``ok``. A window with fewer than ``min_images`` scored images is ``ok`` and
marked ``too_few`` (no test run). :func:`should_retrain`: the last ``n`` windows are all
``retrain``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Optional, Sequence

import numpy as np

from .calibration import INPUT_STATS, Calibration, normalise

__all__ = ["Rules", "VERDICTS", "EXIT_CODES", "wilson_interval", "alarm_p_value", "kolmogorov_sf", "ks_two_sample",
           "psi",
           "expected_alarm_rate", "judge_window", "verdict_of", "split_windows", "monitor_windows",
           "should_retrain", "plot_report", "parse_window"]

VERDICTS = ("ok", "watch", "retrain")
EXIT_CODES = {"ok": 0, "watch": 10, "retrain": 11}  # `recontrast monitor`'s exit code (bad input: 2)
LEVELS = ("none", "moderate", "major")
PSI_BINS = 10  # reference deciles (plus a bin below the reference's minimum and one above its maximum)
_WINDOW = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Rules:
    """The thresholds of the tests and the verdict (``monitor`` settings, config.MonitorConfig)."""

    alpha: float = 0.01
    psi_moderate: float = 0.1
    psi_major: float = 0.25
    confidence: float = 0.95
    min_images: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1 or not 0 < self.confidence < 1:
            raise ValueError("Rules: alpha and confidence must be in (0, 1)")
        if not 0 < self.psi_moderate <= self.psi_major:
            raise ValueError("Rules: need 0 < psi_moderate <= psi_major")
        if self.min_images < 1:
            raise ValueError("Rules: min_images must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- statistics
def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (two-sided, ``confidence``);
    (0, 1) for ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution (``scipy.special.kolmogorov``)."""
    if x <= 0:
        return 1.0
    if x < 1.0:  # the theta-function form converges fast for small x
        s = sum(math.exp(-((2 * k - 1) ** 2) * math.pi ** 2 / (8 * x * x)) for k in range(1, 20))
        return float(min(1.0, max(0.0, 1.0 - math.sqrt(2 * math.pi) / x * s)))
    s = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return float(min(1.0, max(0.0, 2.0 * s)))


def ks_two_sample(sample, reference, n_reference: Optional[int] = None) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: ``(D, p)``, D the largest gap between the two empirical
    CDFs (ties handled), p from the asymptotic Kolmogorov distribution at
    ``sqrt(n m / (n + m)) D``. ``n_reference``: the reference's true size when ``reference``
    holds its quantiles rather than its values (then D is exact to about 1 / len(reference))."""
    a = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    b = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_two_sample: both samples need values")
    grid = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, grid, side="right") / a.size
                            - np.searchsorted(b, grid, side="right") / b.size)))
    m = int(n_reference or b.size)
    en = a.size * m / (a.size + m)
    return d, kolmogorov_sf(math.sqrt(en) * d)


def _cuts(reference: np.ndarray, bins: int) -> np.ndarray:
    """Bin edges from the reference: its minimum, its interior quantiles, its maximum (the
    values equal to the maximum get a bin of their own, so "above everything seen" is one)."""
    lo, hi = float(reference.min()), float(reference.max())
    inner = np.quantile(reference, np.arange(1, bins) / bins)
    return np.r_[np.unique(np.r_[lo, inner, hi]), np.nextafter(hi, np.inf)]


def psi(sample, reference, bins: int = PSI_BINS) -> float:
    """Population stability index of ``sample`` against ``reference``: ``sum((a - e) ln(a / e))``
    over bins cut at the reference's deciles, its minimum and maximum (values below and
    above the reference's range get a bin each); both sides' shares smoothed by half a
    count per bin (bins empty on both sides left out). Conventional reading: < 0.1 stable,
    0.1-0.25 moderate, > 0.25 major."""
    a = np.asarray(sample, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    if a.size == 0 or r.size == 0:
        raise ValueError("psi: both samples need values")
    cuts = _cuts(r, bins)
    ca = np.bincount(np.searchsorted(cuts, a, side="right"), minlength=cuts.size + 1)
    cr = np.bincount(np.searchsorted(cuts, r, side="right"), minlength=cuts.size + 1)
    used = (ca + cr) > 0  # a bin empty on both sides says nothing
    ca, cr, k = ca[used], cr[used], int(used.sum())
    pa = (ca + 0.5) / (a.size + 0.5 * k)
    pr = (cr + 0.5) / (r.size + 0.5 * k)
    return float(np.sum((pa - pr) * np.log(pa / pr)))


def alarm_p_value(alarms: int, n: int, k: Optional[float] = None, n_ref: Optional[int] = None,
                  rate: Optional[float] = None) -> float:
    """P(at least ``alarms`` of ``n`` normal images at or above the threshold). With a
    reference (``k`` of its ``n_ref`` normals at or above the threshold): each new normal
    exceeds with a probability ~ Beta(k, n_ref + 1 - k), so the count is beta-binomial;
    without: binomial at ``rate``."""
    if alarms <= 0:
        return 1.0
    x = np.arange(alarms, n + 1, dtype=np.float64)
    if x.size == 0:
        return 0.0
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    log_choose = math.lgamma(n + 1) - lg(x + 1) - lg(n - x + 1)
    if k is not None and n_ref:
        a, b = max(float(k), 0.5), max(n_ref + 1 - float(k), 0.5)
        lbeta = lambda p, q: lg(p) + lg(q) - lg(p + q)  # noqa: E731
        logp = log_choose + lbeta(x + a, n - x + b) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    else:
        r = min(max(float(rate or 0.01), 1e-12), 1 - 1e-12)
        logp = log_choose + x * math.log(r) + (n - x) * math.log1p(-r)
    top = float(logp.max())
    return float(min(1.0, math.exp(top) * np.exp(logp - top).sum()))


def _level(p: float, value: float, rules: Rules) -> str:
    if p >= rules.alpha:
        return "none"
    return "major" if value >= rules.psi_major else "moderate" if value >= rules.psi_moderate else "none"


def drift_test(sample, reference, rules: Rules, n_reference: Optional[int] = None) -> Optional[dict]:
    """KS + PSI + level of one sample against its reference (None when either is empty)."""
    sample = np.asarray(sample, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    if sample.size == 0 or reference.size == 0:
        return None
    d, p = ks_two_sample(sample, reference, n_reference)
    value = psi(sample, reference)
    return {"n": int(sample.size), "n_reference": int(n_reference or reference.size), "ks_d": round(d, 6),
            "ks_p": float(f"{p:.6g}"), "psi": round(value, 6), "level": _level(p, value, rules),
            "median": float(np.median(sample)), "reference_median": float(np.median(reference))}


# ----------------------------------------------------------------------------- one window
def _exceeding(calib: Calibration) -> Optional[tuple[float, int]]:
    """(k, n): reference normals at or above the threshold, of how many (None without a reference)."""
    ref = calib.reference or {}
    if not ref.get("scores"):
        return None
    n = int(ref["n_scores"])
    return float(np.mean(np.asarray(ref["scores"]) >= calib.threshold)) * n, n


def expected_alarm_rate(calib: Calibration) -> tuple[float, str]:
    """The alarm rate the stored threshold should give on normal images, and how it was got
    (module doc)."""
    kn = _exceeding(calib)
    if kn is not None:
        k, n = kn  # none above (a threshold fitted by F1): half a normal, as alarm_p_value takes it
        return max(k, 0.5) / (n + 1), f"{k:.0f} of {n} reference normals at or above the threshold, /(n+1)"
    if calib.target_fpr is not None:
        return float(calib.target_fpr), "the calibration's target_fpr (the bundle has no reference)"
    return 0.01, "1 % (the bundle has no reference and no target_fpr)"


def judge_window(scores, calib: Calibration, rules: Rules = Rules(), inputs=None) -> dict:
    """One window: raw ``scores`` of the scored images, ``inputs`` (optional, [m, 4]:
    brightness, contrast, width, height of the window's images) -> its report (module doc)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    n = int(s.size)
    alarms = int(np.sum(s >= calib.threshold))
    expected, how = expected_alarm_rate(calib)
    lo, hi = wilson_interval(alarms, n, rules.confidence)
    kn = _exceeding(calib)
    p_alarm = alarm_p_value(alarms, n, *(kn or (None, None)), rate=expected)
    out: dict[str, Any] = {
        "n": n,
        "alarm": {"alarms": alarms, "rate": alarms / n if n else None, "interval": [lo, hi],
                  "confidence": rules.confidence, "expected": expected, "expected_from": how,
                  "target_fpr": calib.target_fpr, "p_value": float(f"{p_alarm:.6g}"),
                  "high": bool(n >= rules.min_images and lo > expected and p_alarm < rules.alpha)},
        "scores": None, "scores_below_threshold": None, "input": None, "too_few": n < rules.min_images,
    }
    ref = calib.reference or {}
    if n and ref.get("scores") and not out["too_few"]:
        rs = np.asarray(ref["scores"], dtype=np.float64)
        n_ref = int(ref["n_scores"])
        norm, rnorm = normalise(s, calib), normalise(rs, calib)
        out["scores"] = drift_test(norm, rnorm, rules, n_ref)
        below, rbelow = norm[s < calib.threshold], rnorm[rs < calib.threshold]
        share = rbelow.size / rs.size
        out["scores_below_threshold"] = drift_test(below, rbelow, rules, max(1, round(n_ref * share)))
    if inputs is not None and ref.get("input") and not out["too_few"]:
        x = np.asarray(inputs, dtype=np.float64).reshape(-1, len(INPUT_STATS))
        x = x[np.all(np.isfinite(x), axis=1)]
        if x.shape[0]:
            block = ref["input"]
            out["input"] = {"n": int(x.shape[0])}
            for j, name in enumerate(INPUT_STATS):
                if name in block:
                    out["input"][name] = drift_test(x[:, j], block[name], rules, int(block["n_images"]))
    out["verdict"], out["reasons"] = verdict_of(out)
    return out


def verdict_of(window: dict) -> tuple[str, list[str]]:
    """(verdict, reasons) of a judged window (module doc)."""
    if window.get("too_few"):
        return "ok", [f"too few images ({window['n']}): not judged"]
    major, moderate = [], []

    def note(name: str, test: Optional[dict]) -> None:
        if test and test["level"] != "none":
            text = (f"{name} drifted ({test['level']}: KS D={test['ks_d']:.3f}, p={test['ks_p']:.2g}, "
                    f"PSI={test['psi']:.3f}; median {test['median']:.4g} vs {test['reference_median']:.4g})")
            (major if test["level"] == "major" else moderate).append(text)

    note("scores below the threshold", window.get("scores_below_threshold"))
    for name in INPUT_STATS:
        note(f"input {name}", (window.get("input") or {}).get(name))
    alarm = window["alarm"]
    if alarm["high"]:
        lo, hi = alarm["interval"]
        moderate.append(f"alarm rate {alarm['rate']:.3f} ({alarm['alarms']}/{window['n']}; "
                        f"{alarm['confidence']:.0%} interval {lo:.3f}-{hi:.3f}, p={alarm['p_value']:.2g}) above the "
                        f"expected {alarm['expected']:.3f}: defects, or drift")
    if major:
        return "retrain", major + moderate
    if moderate:
        return "watch", moderate
    return "ok", []


# ----------------------------------------------------------------------------- windows
def parse_window(spec) -> tuple[str, int]:
    """``"all"`` -> ("all", 0); ``"500"`` -> ("count", 500); ``"6h"`` / ``"1d"`` / ``"30m"`` /
    ``"2w"`` -> ("time", seconds). ValueError otherwise."""
    text = str(spec).strip().lower()
    if text in ("", "all"):
        return "all", 0
    if text.isdigit() and int(text) > 0:
        return "count", int(text)
    m = _WINDOW.match(text)
    if m and int(m[1]) > 0:
        return "time", int(m[1]) * _SECONDS[m[2]]
    raise ValueError(f"window {spec!r}: expected all, a number of images (500) or a duration (30m, 6h, 1d, 1w)")


def split_windows(n: int, spec="all", times: Optional[Sequence] = None) -> list[dict]:
    """Windows over ``n`` rows: ``{"label", "start", "end", "rows"}`` (row indices), oldest
    first. ``times``: UTC epoch seconds per row (NaN: unknown); rows are taken in time order
    (unknown times last, in table order). ``count`` windows are consecutive runs of N rows
    (the last may be shorter); ``time`` windows are UTC buckets of that length, aligned on
    the epoch (1d: midnight to midnight); every row needs a time."""
    kind, size = parse_window(spec)
    t = None if times is None else np.asarray(times, dtype=np.float64).ravel()
    if t is not None and t.size != n:
        raise ValueError(f"split_windows: {t.size} times for {n} rows")
    order = np.arange(n) if t is None else np.lexsort((np.arange(n), np.where(np.isfinite(t), t, np.inf)))

    def span(rows: np.ndarray) -> tuple[Optional[float], Optional[float]]:
        known = np.empty(0) if t is None else t[rows][np.isfinite(t[rows])]
        return (float(known.min()), float(known.max())) if known.size else (None, None)

    if n == 0:
        return []
    if kind == "all":
        start, end = span(order)
        return [{"label": "all", "start": start, "end": end, "rows": order}]
    if kind == "count":
        out = []
        for k in range(0, n, size):
            rows = order[k:k + size]
            start, end = span(rows)
            out.append({"label": f"rows {k}-{k + rows.size - 1}", "start": start, "end": end, "rows": rows})
        return out
    if t is None or not np.all(np.isfinite(t)):
        raise ValueError(f"window {spec!r} needs a time for every row (scored_at)")
    bucket = np.floor(t[order] / size).astype(np.int64)  # non-decreasing: ``order`` is time order
    firsts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    out = []
    for first, rows in zip(firsts, np.split(order, firsts[1:])):
        b = bucket[first]
        out.append({"label": _iso(b * size), "start": float(b * size), "end": float((b + 1) * size), "rows": rows})
    return out


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    import datetime as _dt

    return _dt.datetime.fromtimestamp(float(epoch), _dt.timezone.utc).isoformat(timespec="seconds")


def monitor_windows(scores, calib: Calibration, rules: Rules = Rules(), *, window="all", times=None,
                    inputs=None, unmatched_inputs=None) -> list[dict]:
    """Judge every window of the rows (``scores``: raw, one per scored image; ``times``:
    epoch seconds; ``inputs``: [n, 4] per row, NaN where the row's image was not found).
    ``unmatched_inputs`` ([m, 4]): statistics of images no row names; they join the last
    window's (the present's)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    x = None if inputs is None else np.asarray(inputs, dtype=np.float64).reshape(-1, len(INPUT_STATS))
    windows = split_windows(s.size, window, times)
    out = []
    for i, w in enumerate(windows):
        rows = w["rows"]
        win_inputs = None if x is None else x[rows]
        if unmatched_inputs is not None and i == len(windows) - 1:
            extra = np.asarray(unmatched_inputs, dtype=np.float64).reshape(-1, len(INPUT_STATS))
            win_inputs = extra if win_inputs is None else np.concatenate([win_inputs, extra])
        judged = judge_window(s[rows], calib, rules, win_inputs)
        out.append({"index": i, "label": w["label"], "start": _iso(w["start"]), "end": _iso(w["end"]), **judged})
    return out


def should_retrain(verdicts: Sequence[str], n: int) -> bool:
    """True when the last ``n`` verdicts (oldest first) are all ``retrain``."""
    if n < 1:
        raise ValueError("should_retrain: n must be at least 1")
    tail = list(verdicts)[-n:]
    return len(tail) == n and all(v == "retrain" for v in tail)


def worst(verdicts: Sequence[str]) -> str:
    return max(verdicts, key=VERDICTS.index) if verdicts else "ok"


# ----------------------------------------------------------------------------- the plot
def plot_report(report: dict, path, reference_normalised=(), last_normalised=()) -> None:
    """Three panels: the alarm rate per window (interval, expected rate), the drift of the
    scores below the threshold and of brightness per window (PSI, thresholds), and the
    last window's normalised scores against the reference's (empirical CDFs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = report["windows"]
    x = np.arange(len(windows))
    colours = {"ok": "tab:green", "watch": "tab:orange", "retrain": "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    rates = [w["alarm"]["rate"] if w["alarm"]["rate"] is not None else np.nan for w in windows]
    lo = [w["alarm"]["interval"][0] for w in windows]
    hi = [w["alarm"]["interval"][1] for w in windows]
    ax.vlines(x, lo, hi, color="grey", lw=2, alpha=0.6)
    ax.scatter(x, rates, c=[colours[w["verdict"]] for w in windows], zorder=3)
    if windows:
        ax.axhline(windows[-1]["alarm"]["expected"], ls="--", color="k", lw=1, label="expected")
    ax.set_title("alarm rate (Wilson interval)")
    ax.legend(loc="upper left")
    ax = axes[1]
    rules = report.get("rules", {})
    ax.plot(x, [(w.get("scores_below_threshold") or {}).get("psi", np.nan) for w in windows], marker="o",
            label="scores < threshold")
    for stat in INPUT_STATS:
        vals = [((w.get("input") or {}).get(stat) or {}).get("psi", np.nan) for w in windows]
        if not all(np.isnan(vals)):
            ax.plot(x, vals, marker="s", label=f"input {stat}")
    for key, ls in (("psi_moderate", ":"), ("psi_major", "--")):
        if key in rules:
            ax.axhline(rules[key], ls=ls, color="k", lw=1)
    ax.set_title("PSI against the reference")
    ax.legend(loc="upper left")
    labels = [str(w["label"])[:16] for w in windows]
    for a in axes[:2]:
        a.set_xticks(x, labels, rotation=30 if len(windows) > 1 else 0, ha="right" if len(windows) > 1 else "center",
                     fontsize=8)
        a.set_xlim(-0.5, max(len(windows) - 0.5, 0.5))
    ax = axes[2]
    for values, label in ((reference_normalised, "reference normals"), (last_normalised, "last window")):
        if len(values):
            v = np.sort(values)
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=f"{label} (n={v.size})")
    ax.axvline(0.5, ls="--", color="k", lw=1)
    ax.set_title("normalised scores (0.5 = threshold)")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    verdict = report.get("verdict", "?")
    fig.suptitle(f"{report.get('model', {}).get('version', '')}: {verdict}", color=colours.get(verdict, "k"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
