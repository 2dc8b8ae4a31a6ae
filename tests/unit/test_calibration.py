"""Production threshold and score normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recontrast_core.calibration import Calibration, decide, fit_calibration, normalise


def _brute_f1(labels, scores, t):
    pred = scores >= t
    tp = np.sum(pred & labels)
    return 2 * tp / (pred.sum() + labels.sum())


def test_fpr_path_uses_the_conservative_quantile():
    normal = np.random.default_rng(0).normal(size=1000)
    cal = fit_calibration(normal, target_fpr=0.01)
    assert cal.method == "fpr" and cal.target_fpr == 0.01
    assert (cal.n_normal, cal.n_anomalous) == (1000, 0)
    assert cal.threshold == np.quantile(normal, 0.99, method="higher")
    assert cal.threshold in normal  # an actual score, not an interpolated one
    assert np.mean(decide(normal, cal)) == pytest.approx(0.01)  # 10 of 1000 flagged
    # empty anomalous scores are the same as none
    assert fit_calibration(normal, [], target_fpr=0.01) == cal
    # small sets: the threshold is the maximum normal score
    assert fit_calibration(normal[:50], target_fpr=0.01).threshold == normal[:50].max()


def test_f1_path_picks_the_f1_max_threshold():
    rng = np.random.default_rng(1)
    normal = rng.normal(size=200)
    anomalous = rng.normal(loc=2.0, size=40)
    cal = fit_calibration(normal, anomalous, target_fpr=0.05)
    assert cal.method == "f1" and cal.target_fpr is None
    assert (cal.n_normal, cal.n_anomalous) == (200, 40)
    labels = np.r_[np.zeros(200, bool), np.ones(40, bool)]
    scores = np.r_[normal, anomalous]
    best = max(_brute_f1(labels, scores, t) for t in np.unique(scores))
    assert _brute_f1(labels, scores, cal.threshold) == pytest.approx(best, abs=1e-12)
    assert cal.threshold in scores


@pytest.mark.parametrize("with_anomalies", [False, True])
def test_threshold_maps_to_exactly_one_half_and_the_map_is_monotone(with_anomalies):
    rng = np.random.default_rng(2)
    normal = rng.gamma(2.0, size=300)
    anomalous = rng.gamma(6.0, size=30) if with_anomalies else None
    cal = fit_calibration(normal, anomalous)
    assert normalise(cal.threshold, cal) == 0.5
    assert normalise(np.array([cal.lo, cal.hi]), cal).tolist() == [0.0, 1.0]
    assert cal.lo == normal.min()
    assert cal.hi == pytest.approx(2 * cal.threshold - np.median(normal))
    grid = np.sort(np.r_[rng.uniform(-5, 30, 2000), cal.threshold, -np.inf, np.inf])
    out = normalise(grid, cal)
    assert np.all(np.diff(out) >= 0)
    assert out.min() == 0.0 and out.max() == 1.0
    # linear pieces: the midpoints land on 0.25 and 0.75
    assert normalise((cal.lo + cal.threshold) / 2, cal) == pytest.approx(0.25)
    assert normalise((cal.hi + cal.threshold) / 2, cal) == pytest.approx(0.75)


def test_decide_agrees_with_normalise_everywhere_including_at_the_threshold():
    rng = np.random.default_rng(3)
    cal = fit_calibration(rng.normal(size=100), rng.normal(2, size=20))
    t = cal.threshold
    near = [t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf)]
    scores = np.r_[rng.normal(size=5000), near]
    assert np.array_equal(decide(scores, cal), normalise(scores, cal) >= 0.5)
    assert decide(near, cal).tolist() == [True, False, True]
    # shape is kept
    assert decide(np.zeros((2, 3)), cal).shape == normalise(np.zeros((2, 3)), cal).shape == (2, 3)


def test_just_below_threshold_stays_below_half_despite_rounding():
    # (s - lo) / (t - lo) rounds to 1.0 for s one ulp below t when lo is far away.
    cal = Calibration(threshold=1.0, lo=-1e20, hi=2.0, method="fpr", target_fpr=0.01, n_normal=5, n_anomalous=0)
    s = np.nextafter(1.0, 0.0)
    assert not decide(s, cal)
    assert normalise(s, cal) < 0.5


def test_degenerate_normal_scores_still_give_a_valid_map():
    cal = fit_calibration(np.full(20, 3.0))  # all equal: threshold 3.0, no spread
    assert cal.lo < cal.threshold == 3.0 < cal.hi
    assert normalise(3.0, cal) == 0.5
    # F1 threshold below every normal score (anomalies score low): still lo < t < hi
    cal = fit_calibration([5.0, 6.0, 7.0], [1.0, 1.5])
    assert cal.lo < cal.threshold < cal.hi
    assert normalise(cal.threshold, cal) == 0.5


def test_round_trip_through_json():
    rng = np.random.default_rng(4)
    cal = fit_calibration(rng.normal(size=50), target_fpr=0.1)
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal
    scores = rng.normal(size=100)
    assert np.array_equal(normalise(scores, back), normalise(scores, cal))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="normal"):
        fit_calibration([])
    with pytest.raises(ValueError, match="normal"):
        fit_calibration(np.array([]), [1.0, 2.0])
    with pytest.raises(ValueError, match="target_fpr"):
        fit_calibration([1.0, 2.0], target_fpr=0.0)
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration([1.0, np.nan])
    cal = fit_calibration([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        normalise([np.nan], cal)
    with pytest.raises(ValueError, match="missing keys"):
        Calibration.from_dict({"threshold": 1.0})
    with pytest.raises(ValueError, match="lo < threshold < hi"):
        Calibration(threshold=1.0, lo=2.0, hi=3.0, method="f1", target_fpr=None, n_normal=1, n_anomalous=1)
    with pytest.raises(ValueError, match="method"):
        Calibration(threshold=1.0, lo=0.0, hi=3.0, method="max", target_fpr=None, n_normal=1, n_anomalous=1)
