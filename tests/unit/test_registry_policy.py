"""decide_promotion: the pure promotion rule (no MLflow)."""

import math

import pytest

from recontrast_core.promotion import Decision, PromotionPolicy, decide_promotion

POLICY = PromotionPolicy(floors={"image_auroc": 0.7}, primary_metric="image_auroc", margin=0.005)


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
    policy = PromotionPolicy(secondary_metrics=("pixel_auroc",), secondary_tolerance=0.01)
    champ = {"image_auroc": 0.90, "pixel_auroc": 0.95}
    assert not decide_promotion({"image_auroc": 0.95, "pixel_auroc": 0.90}, champ, policy).promote
    assert decide_promotion({"image_auroc": 0.95, "pixel_auroc": 0.945}, champ, policy).promote


def test_other_primary_metric_and_margin():
    policy = PromotionPolicy(floors={}, primary_metric="aupro", margin=0.02)
    assert not decide_promotion({"aupro": 0.81}, {"aupro": 0.80}, policy).promote
    assert decide_promotion({"aupro": 0.83}, {"aupro": 0.80}, policy).promote


def test_baseline_floor_blocks_a_candidate_below_the_training_free_baseline():
    policy = PromotionPolicy(floors={"image_auroc": 0.5})  # baseline_floor on by default, tolerance 0.02
    below = {"image_auroc": 0.77, "baseline_image_auroc": 0.86}
    d = decide_promotion(below, None, policy)
    assert not d.promote and "below the training-free baseline" in d.reason and "0.8600" in d.reason
    within = {"image_auroc": 0.845, "baseline_image_auroc": 0.86}  # within the tolerance
    assert decide_promotion(within, None, policy).promote
    assert decide_promotion(below, None, policy.model_copy(update={"baseline_floor": False})).promote
    assert decide_promotion(below, None, policy.model_copy(update={"baseline_tolerance": 0.1})).promote
    # no baseline measured (an older metrics.json): nothing to compare, the floor does not apply
    assert decide_promotion({"image_auroc": 0.77}, None, policy).promote
    # the rule follows the primary metric
    pix = policy.model_copy(update={"primary_metric": "pixel_auroc", "floors": {}})
    assert not decide_promotion({"pixel_auroc": 0.80, "baseline_pixel_auroc": 0.90, "image_auroc": 0.99}, None, pix).promote


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
