"""Metrics against sklearn, brute-force references and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from recontrast_core.metrics import (
    aupro,
    aupro_per_image,
    compute_all,
    image_auroc,
    image_f1_max,
    paired_bootstrap_delta,
    pixel_auroc,
)

EIGHT = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------- fixtures


def _multi_region_case(rng, quantise: int | None = None, dtype=np.float64):
    """Four 24x24 images: two regions of different sizes in image 0 (plus a diagonal
    pair that is one 8-connected region), one region in image 1, two normal images."""
    masks = np.zeros((4, 24, 24), dtype=bool)
    masks[0, 2:5, 2:5] = True  # 9 px
    masks[0, 12:20, 10:22] = True  # 96 px
    masks[0, 21, 1] = masks[0, 22, 2] = True  # diagonal pair: one region (8-conn)
    masks[1, 6:10, 14:17] = True  # 12 px
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if quantise:
        maps = np.round(maps * quantise) / quantise  # many ties, also across classes
    return masks, maps.astype(dtype)


def _brute_pro_points(masks, maps, thresholds):
    """(FPR, PRO) at each threshold by direct comparison over the whole arrays."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=EIGHT)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    pts = []
    for t in thresholds:
        pred = maps >= t
        fpr = np.logical_and(pred, normal).sum() / normal.sum()
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        pts.append((fpr, pro))
    return pts


def _brute_area(points, limit):
    """Trapezoid area on [0, limit] of the polyline through points (sorted by FPR),
    with the curve linearly interpolated where a segment crosses the limit."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
    return area


def brute_aupro(masks, maps, limit=0.3, thresholds=None):
    if thresholds is None:  # every distinct score: the exact curve
        thresholds = np.unique(maps)
    thresholds = np.sort(np.asarray(thresholds))[::-1]
    pts = [(0.0, 0.0)] + _brute_pro_points(masks, maps, thresholds) + [(1.0, 1.0)]
    pts.sort(key=lambda p: (p[0], p[1]))
    return _brute_area(pts, limit) / limit


# ----------------------------------------------------------------------------- image level


def test_image_auroc_hand_value_and_sklearn_with_ties():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 12, 300) + 0.5 * labels  # many ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels.astype(bool), scores) == pytest.approx(roc_auc_score(labels, scores))


def test_image_auroc_one_class_is_a_clear_error():
    with pytest.raises(ValueError, match="both normal"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])


def _brute_f1_max(labels, scores):
    labels = np.asarray(labels, bool)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        f1 = 2 * tp / (2 * tp + fp + fn)
        best = max(best, f1)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_image_f1_max_matches_brute_force_over_all_thresholds(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 80)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=80) + labels * rng.random(), 1)  # ties
    f1, thr = image_f1_max(labels, scores)
    assert f1 == pytest.approx(_brute_f1_max(labels, scores), abs=1e-12)
    # the returned threshold really achieves it with the ">=" rule
    pred = scores >= thr
    tp = np.sum(pred & (labels == 1))
    assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)


def test_image_f1_max_hand_value():
    # t=0.9: tp 1, fp 0, fn 1 -> 2/3; t=0.8: tp 1, fp 1, fn 1 -> 1/2;
    # t=0.7: tp 2, fp 1, fn 0 -> 4/5 (best); t=0.1: tp 2, fp 2 -> 2/3
    f1, thr = image_f1_max([0, 0, 1, 1], [0.1, 0.8, 0.7, 0.9])
    assert (f1, thr) == (pytest.approx(0.8), 0.7)
    # best at the highest threshold
    assert image_f1_max([0, 0, 1], [0.1, 0.2, 0.9]) == (1.0, 0.9)


# ----------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("quantise,dtype", [(None, np.float64), (None, np.float32), (8, np.float32)])
def test_pixel_auroc_matches_sklearn(quantise, dtype):
    masks, maps = _multi_region_case(np.random.default_rng(5), quantise, dtype)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # 0/1 integer masks and lists of differently sized images are accepted
    assert pixel_auroc(masks.astype(np.uint8), list(maps)) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_list_of_different_sizes():
    rng = np.random.default_rng(2)
    masks = [rng.random((8, 12)) > 0.8, rng.random((5, 7)) > 0.5]
    maps = [rng.integers(0, 5, m.shape) + m for m in masks]
    flat_m = np.concatenate([m.ravel() for m in masks])
    flat_s = np.concatenate([s.ravel() for s in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_m, flat_s), abs=1e-12)


def test_pixel_auroc_rejects_bad_input():
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="0/1 or bool"):
        pixel_auroc(np.full((2, 4, 4), 255), maps)
    with pytest.raises(ValueError, match="both normal and anomalous pixels"):
        pixel_auroc(np.zeros((2, 4, 4)), maps)
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(np.zeros((2, 4, 4)), maps[:, :3])


# ----------------------------------------------------------------------------- AUPRO


def test_aupro_hand_checked_two_regions_and_a_normal_image():
    # Image 0: region A = 1 px at 0.9; region B = 3 px at 0.8, 0.8, 0.2.
    # Image 1: normal, one normal pixel at 0.85. All other normal pixels 0.1 (28 normal px).
    # Curve: (0,0) -> (0,1/2) -> (1/28,1/2) -> (1/28,5/6) -> (1/28,1) -> (1,1).
    # Area on [0, 0.3] = 0.5/28 + (0.3 - 1/28); divided by 0.3.
    m = np.zeros((2, 4, 4), bool)
    m[0, 0, 0] = True
    m[0, 3, 1:4] = True
    a = np.full((2, 4, 4), 0.1)
    a[0, 0, 0] = 0.9
    a[0, 3, 1:3] = 0.8
    a[0, 3, 3] = 0.2
    a[1, 2, 2] = 0.85
    expected = (0.5 / 28 + 0.3 - 1 / 28) / 0.3
    assert aupro(m, a) == pytest.approx(expected, abs=1e-12)


def test_aupro_interpolates_at_the_limit_with_cross_class_ties():
    # One region of 2 px at 0.5; 4 normal px tied at 0.5, 4 at 0. Curve (0,0)->(0.5,1)->(1,1):
    # at FPR 0.3 the PRO is 0.6, area 0.5 * 0.3 * 0.6 = 0.09, normalised 0.3.
    m = np.zeros((1, 1, 10), bool)
    m[0, 0, :2] = True
    a = np.zeros((1, 1, 10))
    a[0, 0, :6] = 0.5
    assert aupro(m, a) == pytest.approx(0.3, abs=1e-12)
    # a limit exactly on a curve point needs no interpolation: area 0.25 on [0, 0.5]
    assert aupro(m, a, fpr_limit=0.5) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_are_8_connected():
    # Mask pixels (0,0), (1,1), (1,2): one 8-connected region of 3 px (two 4-connected ones).
    # (0,0) scores 1, the rest 0 like the normal pixels: curve (0,0)->(0,1/3)->(1,1).
    # 8-conn: (1/3 + 1/3 + 0.3 * 2/3) / 2 = 13/30. (4-conn would give 0.575.)
    m = np.zeros((1, 5, 5), bool)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 1, 2] = True
    a = np.zeros((1, 5, 5))
    a[0, 0, 0] = 1.0
    assert aupro(m, a) == pytest.approx(13 / 30, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force_exact_curve_with_ties(seed):
    masks, maps = _multi_region_case(np.random.default_rng(seed), quantise=40)
    for limit in (0.3, 0.05, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            brute_aupro(masks, maps, limit), abs=1e-9
        )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_aupro_matches_brute_force_many_thresholds(dtype):
    masks, maps = _multi_region_case(np.random.default_rng(7), dtype=dtype)
    ref = brute_aupro(masks, maps, 0.3, np.linspace(maps.min(), maps.max(), 3000))
    assert aupro(masks, maps) == pytest.approx(ref, abs=1e-3)
    assert 0.3 < ref < 0.95  # a case that is neither trivial nor perfect
    # the binned variant evaluates the same thresholds: the same curve, the same area
    binned = aupro(masks, maps, num_thresholds=3000)
    assert binned == pytest.approx(ref, abs=1e-9)


def test_aupro_perfect_detector_is_one_and_normal_images_count():
    masks, maps = _multi_region_case(np.random.default_rng(3))
    perfect = np.where(masks, 2.0 + maps, maps)
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    # a false alarm on a normal image (image 3) above every anomalous score lowers AUPRO
    spoiled = perfect.copy()
    spoiled[3, :10, :10] = 10.0
    assert aupro(masks, spoiled) < 0.95


def test_aupro_requires_regions():
    with pytest.raises(ValueError, match="anomalous region"):
        aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4)))


# ----------------------------------------------------------------------------- ReContrast AUPRO


def _recontrast_reference_one(mask, amap, num_th=200, limit=0.3):
    """Direct translation of ReContrast's utils.compute_pro for one image (loops)."""
    lab, n = ndimage.label(mask, structure=EIGHT)
    fprs, pros = [], []
    delta = (amap.max() - amap.min()) / num_th
    for th in np.arange(amap.min(), amap.max(), delta):
        binary = amap > th
        region_pros = [binary[lab == k].sum() / (lab == k).sum() for k in range(1, n + 1)]
        inverse = ~mask
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.mean(region_pros))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    x = fprs[keep] / fprs[keep].max()
    y = pros[keep]
    return -np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)


def test_aupro_per_image_matches_a_direct_translation_of_the_reference():
    masks, maps = _multi_region_case(np.random.default_rng(11))
    expected = np.mean([_recontrast_reference_one(masks[i], maps[i]) for i in (0, 1)])
    assert aupro_per_image(masks, maps) == pytest.approx(expected, abs=1e-12)
    # normal images do not take part (unlike the dataset-level aupro)
    assert aupro_per_image(masks[:2], maps[:2]) == pytest.approx(expected, abs=1e-12)
    assert aupro_per_image(masks, maps) != pytest.approx(aupro(masks, maps), abs=1e-3)


def test_aupro_per_image_drops_points_at_exactly_the_fpr_limit():
    # 10 normal pixels: FPRs are multiples of 0.1, so one lands exactly on 0.3 and the
    # reference's strict "fpr < 0.3" filter (and its rescaling by the largest kept FPR)
    # decides the value.
    mask = np.zeros((1, 4, 5), bool)
    mask[0, :2, :5] = True
    amap = np.zeros((1, 4, 5))
    amap[0, :2] = np.linspace(0.3, 1.0, 10).reshape(2, 5)
    amap[0, 2:] = np.linspace(0.05, 0.95, 10).reshape(2, 5)
    expected = _recontrast_reference_one(mask[0], amap[0], num_th=20)
    assert aupro_per_image(mask, amap, num_thresholds=20) == pytest.approx(expected, abs=1e-12)


def test_aupro_per_image_strict_binarisation_with_thresholds_on_pixel_values():
    # Integer maps 0..20 with 20 thresholds: every threshold equals some pixel values,
    # so "score > th" (reference) and "score >= th" give different curves.
    rng = np.random.default_rng(12)
    masks, _ = _multi_region_case(rng)
    maps = rng.integers(0, 15, masks.shape) + rng.integers(0, 7, masks.shape) * masks
    maps[:, 0, 0] = [0, 20, 0, 0]
    maps[0, 2, 2] = 20
    expected = np.mean([_recontrast_reference_one(masks[i], maps[i], num_th=20) for i in (0, 1)])
    assert aupro_per_image(masks, maps, num_thresholds=20) == pytest.approx(expected, abs=1e-12)


def test_aupro_per_image_perfect_map_near_one_random_map_lower():
    rng = np.random.default_rng(4)
    masks, _ = _multi_region_case(rng)
    noise = rng.random(masks.shape)
    perfect = np.where(masks, 0.6 + 0.4 * noise, 0.4 * noise)
    assert aupro_per_image(masks, perfect) > 0.99
    random_value = aupro_per_image(masks, noise)
    assert random_value < 0.5
    # every kept FPR is 0 (normal pixels all at the minimum; the reference divides by
    # zero): defined as the best PRO reached without false positives, here 1
    step = np.where(masks, 0.5 + 0.5 * noise, 0.0)
    assert aupro_per_image(masks, step) == 1.0
    # a constant map localises nothing
    assert aupro_per_image(masks, np.ones(masks.shape)) == 0.0


# ----------------------------------------------------------------------------- compute_all


def test_compute_all_keys_and_values():
    rng = np.random.default_rng(9)
    masks, maps = _multi_region_case(rng)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    res = compute_all(labels, scores)
    assert set(res) == {"image_auroc", "image_f1_max", "image_f1_threshold"}
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    full = compute_all(labels, scores, masks, maps)
    assert set(full) == set(res) | {"pixel_auroc", "aupro", "aupro_per_image"}
    assert full["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert full["aupro"] == pytest.approx(aupro(masks, maps))
    assert all(isinstance(v, float) for v in full.values())
    # masks without any anomalous pixel: no pixel ground truth, pixel keys omitted
    assert set(compute_all(labels, scores, np.zeros_like(masks), maps)) == set(res)
    with pytest.raises(ValueError, match="without anomaly maps"):
        compute_all(labels, scores, masks, None)


# ----------------------------------------------------------------------------- paired bootstrap


def _scored_images(seed=0, n_pos=150, n_neg=250, shift=1.0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return labels, rng.normal(size=labels.size) + shift * labels


def test_paired_bootstrap_identical_scores_give_zero():
    labels, scores = _scored_images()
    r = paired_bootstrap_delta(labels, scores, scores.copy())
    assert r["delta"] == 0.0 and r["lo"] <= 0.0 <= r["hi"]
    assert r["n_boot"] == 1000 and r["confidence"] == 0.95


def test_paired_bootstrap_clearly_better_scores_lie_above_zero():
    labels, weak = _scored_images(shift=0.5)
    strong = weak + 1.5 * labels  # the same images, anomalies scored much higher
    r = paired_bootstrap_delta(labels, strong, weak)
    assert r["delta"] == pytest.approx(roc_auc_score(labels, strong) - roc_auc_score(labels, weak))
    assert 0.0 < r["lo"] <= r["delta"] <= r["hi"]
    flipped = paired_bootstrap_delta(labels, weak, strong)  # the other way round: all below 0
    assert flipped["hi"] < 0 and flipped["delta"] == pytest.approx(-r["delta"])


def test_paired_bootstrap_is_deterministic_with_the_seed_and_pairs_the_images():
    labels, a = _scored_images(seed=1)
    b = np.round(np.random.default_rng(2).normal(size=labels.size) + 0.8 * labels, 1)  # with ties
    r1 = paired_bootstrap_delta(labels, a, b, seed=3)
    assert r1 == paired_bootstrap_delta(labels, a, b, seed=3)
    assert r1 != paired_bootstrap_delta(labels, a, b, seed=4)
    assert r1["lo"] < r1["delta"] < r1["hi"]
    # a wider level gives a wider interval from the same replicates
    r99 = paired_bootstrap_delta(labels, a, b, seed=3, confidence=0.99)
    assert r99["lo"] <= r1["lo"] and r99["hi"] >= r1["hi"]
    # pairing: b = a + noise far smaller than the spread between images gives a narrow
    # interval (resampling the two independently gives one ~0.14 wide here)
    c = a + np.random.default_rng(5).normal(scale=0.01, size=a.size)
    r = paired_bootstrap_delta(labels, a, c)
    assert r["hi"] - r["lo"] < 0.01


def test_paired_bootstrap_fast_auroc_matches_the_generic_path():
    labels, a = _scored_images(seed=6, n_pos=30, n_neg=50)
    b = np.round(a + np.random.default_rng(7).normal(scale=0.5, size=a.size), 1)
    fast = paired_bootstrap_delta(labels, a, b, n_boot=200, seed=9)
    generic = paired_bootstrap_delta(labels, a, b, metric=lambda y, s: image_auroc(y, s), n_boot=200, seed=9)
    assert fast == pytest.approx(generic)
    f1 = paired_bootstrap_delta(labels, a, b, metric=image_f1_max, n_boot=50)  # a tuple metric: its value
    assert f1["delta"] == pytest.approx(image_f1_max(labels, a)[0] - image_f1_max(labels, b)[0])


def test_paired_bootstrap_is_fast_enough_for_an_evaluation():
    import time

    labels, a = _scored_images(seed=8)
    t0 = time.perf_counter()
    paired_bootstrap_delta(labels, a, a[::-1].copy())
    assert time.perf_counter() - t0 < 3.0  # 1000 replicates on 400 images (~0.1 s here)


@pytest.mark.parametrize(
    "labels, a, b, kwargs, message",
    [
        ([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2], {}, "3 labels but 2 scores"),
        ([1, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], {}, "both normal"),
        ([0, 1], [0.1, 0.2], [0.1, np.nan], {}, "NaN"),
        ([0, 1], [0.1, 0.2], [0.1, 0.2], {"n_boot": 0}, "n_boot"),
        ([0, 1], [0.1, 0.2], [0.1, 0.2], {"confidence": 1.0}, "confidence"),
    ],
)
def test_paired_bootstrap_rejects_bad_input(labels, a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap_delta(np.array(labels), np.array(a), np.array(b), **kwargs)


def test_metric_names_are_declared_once_and_match_compute_all():
    import numpy as np

    from recontrast_core import metrics as M

    rng = np.random.default_rng(0)
    masks = [np.zeros((8, 8), bool) for _ in range(4)]
    masks[2][2:5, 2:5] = True
    masks[3][1:3, 4:7] = True
    maps = [rng.random((8, 8)) for _ in range(4)]
    out = M.compute_all([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], masks, maps)
    declared = set(M.IMAGE_METRICS) | set(M.PIXEL_METRICS)
    assert set(out) == declared | {"image_f1_threshold"}
    for subset in (M.KEY_METRICS, M.RANK_METRICS, M.REPORTED_METRICS):
        assert set(subset) <= declared
