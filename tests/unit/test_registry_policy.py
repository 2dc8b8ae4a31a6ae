"""decide_promotion: the pure promotion rule (no MLflow)."""

import math

import pytest

from recontrast_core.promotion import Decision, PromotionPolicy, decide_promotion

# The champion comparison, floors and secondary guard alone: these metrics carry no
# training-free baseline, so the baseline floor (which fails closed) is off here; the
# baseline tests below turn it on.
POLICY = PromotionPolicy(floors={"image_auroc": 0.7}, primary_metric="image_auroc", margin=0.005,
                         baseline_floor=False)


def test_better_by_more_than_margin_promotes():
    d = decide_promotion({"image_auroc": 0.93}, {"image_auroc": 0.90}, POLICY)
    assert isinstance(d, Decision)
    assert d.promote is True
    assert "beats champion" in d.reason


def test_worse_is_not_promoted():
    d = decide_promotion({"image_auroc": 0.85}, {"image_auroc": 0.90}, POLICY)
    assert d.promote is False
    assert "worse" in d.reason


@pytest.mark.parametrize("cand", [0.902, 0.905, 0.898, 0.90])
def test_within_margin_is_not_promoted(cand):
    d = decide_promotion({"image_auroc": cand}, {"image_auroc": 0.90}, POLICY)
    assert d.promote is False
    assert "margin" in d.reason


def test_just_above_margin_promotes():
    assert decide_promotion({"image_auroc": 0.9051}, {"image_auroc": 0.90}, POLICY).promote


def test_below_floor_is_not_promoted_even_without_champion():
    d = decide_promotion({"image_auroc": 0.65}, None, POLICY)
    assert d.promote is False
    assert "floor" in d.reason


def test_below_secondary_floor_is_not_promoted():
    policy = PromotionPolicy(floors={"image_auroc": 0.7, "pixel_auroc": 0.8})
    d = decide_promotion({"image_auroc": 0.99, "pixel_auroc": 0.79}, {"image_auroc": 0.5}, policy)
    assert d.promote is False
    assert "pixel_auroc" in d.reason


def test_no_champion_promotes():
    d = decide_promotion({"image_auroc": 0.75}, None, POLICY)
    assert d.promote is True
    assert "no champion" in d.reason


@pytest.mark.parametrize("metrics", [{}, {"image_auroc": None}, {"image_auroc": math.nan}])
def test_missing_or_nan_primary_is_not_promoted(metrics):
    assert decide_promotion(metrics, None, POLICY).promote is False


def test_champion_without_primary_metric_blocks():
    assert decide_promotion({"image_auroc": 0.99}, {"pixel_auroc": 0.9}, POLICY).promote is False


def test_secondary_guard():
    policy = PromotionPolicy(secondary_metrics=("pixel_auroc",), secondary_tolerance=0.01, baseline_floor=False)
    champ = {"image_auroc": 0.90, "pixel_auroc": 0.95}
    assert not decide_promotion({"image_auroc": 0.95, "pixel_auroc": 0.90}, champ, policy).promote
    assert decide_promotion({"image_auroc": 0.95, "pixel_auroc": 0.945}, champ, policy).promote


def test_other_primary_metric_and_margin():
    policy = PromotionPolicy(floors={}, primary_metric="aupro", margin=0.02, baseline_floor=False)
    assert not decide_promotion({"aupro": 0.81}, {"aupro": 0.80}, policy).promote
    assert decide_promotion({"aupro": 0.83}, {"aupro": 0.80}, policy).promote


def test_baseline_floor_blocks_a_candidate_below_the_training_free_baseline():
    policy = PromotionPolicy(floors={"image_auroc": 0.5})  # baseline_floor on by default, tolerance 0.02
    below = {"image_auroc": 0.77, "baseline_image_auroc": 0.86}  # no bootstrap interval: the flat rule
    d = decide_promotion(below, None, policy)
    assert not d.promote and "below the training-free baseline" in d.reason and "0.8600" in d.reason
    assert "flat rule" in d.reason and "no bootstrap interval" in d.reason
    within = {"image_auroc": 0.845, "baseline_image_auroc": 0.86}  # within the tolerance
    d = decide_promotion(within, None, policy)
    assert d.promote and "baseline delta -0.015 (flat rule" in d.reason
    off = decide_promotion(below, None, policy.model_copy(update={"baseline_floor": False}))
    assert off.promote and "baseline floor off (registry.baseline_floor=false)" in off.reason
    assert decide_promotion(below, None, policy.model_copy(update={"baseline_tolerance": 0.1})).promote
    # the rule follows the primary metric
    pix = policy.model_copy(update={"primary_metric": "pixel_auroc", "floors": {}})
    assert not decide_promotion({"pixel_auroc": 0.80, "baseline_pixel_auroc": 0.90, "image_auroc": 0.99}, None, pix).promote


@pytest.mark.parametrize("baseline", [None, math.nan, "n/a"])
def test_baseline_floor_fails_closed_without_a_baseline(baseline):
    policy = PromotionPolicy(floors={"image_auroc": 0.5})
    metrics = {"image_auroc": 0.97} if baseline is None else {"image_auroc": 0.97, "baseline_image_auroc": baseline}
    for champion in (None, {"image_auroc": 0.80}):  # however good the candidate is
        d = decide_promotion(metrics, champion, policy)
        assert not d.promote
        assert "no training-free baseline (baseline_image_auroc)" in d.reason and "fails closed" in d.reason
        assert "registry.baseline_floor=false" in d.reason  # says how to turn it off
    # an interval without the baseline itself does not count either
    assert not decide_promotion({**metrics, "baseline_delta_image_auroc_lo": 0.01,
                                 "baseline_delta_image_auroc_hi": 0.05}, None, policy).promote


def test_baseline_floor_off_is_recorded_in_the_reason():
    policy = PromotionPolicy(floors={"image_auroc": 0.5}, baseline_floor=False)
    note = "baseline floor off (registry.baseline_floor=false)"
    d = decide_promotion({"image_auroc": 0.9}, None, policy)
    assert d.promote and d.reason.startswith("no champion") and d.reason.endswith(note)
    d = decide_promotion({"image_auroc": 0.93}, {"image_auroc": 0.90}, policy)
    assert d.promote and "beats champion" in d.reason and note in d.reason
    d = decide_promotion({"image_auroc": 0.85}, {"image_auroc": 0.90}, policy)
    assert not d.promote and "worse" in d.reason and note in d.reason
    # off means off: a measured baseline far above is not compared either
    assert decide_promotion({"image_auroc": 0.6, "baseline_image_auroc": 0.95}, None, policy).promote


def _with_interval(cand, base, lo, hi, metric="image_auroc", **extra):
    return {metric: cand, f"baseline_{metric}": base, f"baseline_delta_{metric}_lo": lo,
            f"baseline_delta_{metric}_hi": hi, **extra}


def test_bootstrap_rule_refuses_only_a_significantly_worse_candidate():
    policy = PromotionPolicy(floors={"image_auroc": 0.5})  # baseline_rule="bootstrap" by default
    assert policy.baseline_rule == "bootstrap"
    # 0.05 below the baseline, the whole interval below 0: refused, with the numbers
    worse = _with_interval(0.88, 0.93, -0.081, -0.020, baseline_delta_image_auroc_confidence=0.95)
    d = decide_promotion(worse, None, policy)
    assert not d.promote
    assert "below the training-free baseline: image_auroc 0.8800 vs baseline 0.9300, delta -0.0500" in d.reason
    assert "95% paired bootstrap interval [-0.081, -0.020]" in d.reason
    # the same 0.05 deficit on too few images to tell (interval straddles 0): not refused,
    # although the flat rule (tolerance 0.02) would refuse it
    noisy = _with_interval(0.88, 0.93, -0.14, 0.03)
    d = decide_promotion(noisy, None, policy)
    assert d.promote and d.reason.startswith("no champion")
    assert "; baseline delta -0.050 [-0.140, +0.030] (paired bootstrap)" in d.reason
    assert not decide_promotion(noisy, None, policy.model_copy(update={"baseline_rule": "flat"})).promote
    # a small but significant deficit, within the flat tolerance: refused by the bootstrap rule
    small = _with_interval(0.915, 0.93, -0.025, -0.004)
    assert not decide_promotion(small, None, policy).promote
    flat = decide_promotion(small, None, policy.model_copy(update={"baseline_rule": "flat"}))
    assert flat.promote and "flat rule, tolerance 0.02" in flat.reason and "bootstrap" not in flat.reason
    # the note survives the champion comparison, promoted or not
    better = _with_interval(0.95, 0.93, -0.004, 0.046)
    d = decide_promotion(better, {"image_auroc": 0.90}, policy)
    assert d.promote and "beats champion" in d.reason and "baseline delta +0.020 [-0.004, +0.046]" in d.reason
    d = decide_promotion(better, {"image_auroc": 0.96}, policy)
    assert not d.promote and "worse than champion" in d.reason and "baseline delta +0.020" in d.reason
    # an interval touching 0 is not "below 0"
    assert decide_promotion(_with_interval(0.90, 0.93, -0.06, 0.0), None, policy).promote
    # only one end present: the flat rule, and the reason says why
    half = {"image_auroc": 0.90, "baseline_image_auroc": 0.93, "baseline_delta_image_auroc_lo": -0.05}
    d = decide_promotion(half, None, policy)
    assert not d.promote and "flat rule, no bootstrap interval" in d.reason


def test_bootstrap_rule_follows_the_normal_only_fallback():
    policy = PromotionPolicy(floors={"image_auroc": 0.7})
    worse = _with_interval(0.80, 0.90, -0.15, -0.05, metric="synthetic_image_auroc")
    d = decide_promotion(worse, None, policy)
    assert not d.promote and "synthetic_image_auroc 0.8000 vs baseline 0.9000" in d.reason
    assert "paired bootstrap interval [-0.150, -0.050]" in d.reason
    noisy = _with_interval(0.85, 0.90, -0.12, 0.02, metric="synthetic_image_auroc")
    assert decide_promotion(noisy, None, policy).promote
    d = decide_promotion({"synthetic_image_auroc": 0.93}, None, policy)  # fails closed here too
    assert not d.promote and "no training-free baseline (baseline_synthetic_image_auroc)" in d.reason


def test_policy_baseline_rule_is_validated():
    from pydantic import ValidationError

    assert PromotionPolicy(baseline_rule="flat").to_dict()["baseline_rule"] == "flat"
    with pytest.raises(ValidationError):
        PromotionPolicy(baseline_rule="percentile")


def test_registry_config_is_the_policy_plus_a_model_name():
    from recontrast_core.config import RegistryConfig

    cfg = RegistryConfig(model_name="m", margin=0.01)
    assert cfg.policy() == PromotionPolicy(margin=0.01)  # the same defaults, one place
    assert "model_name" not in cfg.to_dict()


def test_normal_only_evaluations_compare_the_synthetic_auroc_both_have():
    policy = PromotionPolicy(floors={"image_auroc": 0.7})
    cand = {"synthetic_image_auroc": 0.93, "baseline_synthetic_image_auroc": 0.90, "fpr_at_threshold": 0.01}
    d = decide_promotion(cand, None, policy)
    assert d.promote and "synthetic_image_auroc" in d.reason
    assert not decide_promotion({**cand, "synthetic_image_auroc": 0.6}, None, policy).promote  # the floor carries over
    assert not decide_promotion({**cand, "synthetic_image_auroc": 0.85}, None, policy).promote  # below the baseline
    assert decide_promotion(cand, {"synthetic_image_auroc": 0.90}, policy).promote
    assert not decide_promotion(cand, {"image_auroc": 0.95}, policy).promote  # nothing in common: not comparable
    assert not decide_promotion({"fpr_at_threshold": 0.0}, None, policy).promote  # nothing to rank on
