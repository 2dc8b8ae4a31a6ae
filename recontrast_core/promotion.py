"""The promotion rule: when a candidate may replace the champion. Pure: no MLflow, no I/O.

:class:`PromotionPolicy` holds the only defaults of the rule (``RegistryConfig`` in the
pipeline settings extends it with the model name). :func:`decide_promotion` promotes a
candidate only if

1. every absolute floor holds (``image_auroc >= 0.7``, ...);
2. the candidate is not worse than the training-free baseline measured on the same test
   data (``baseline_<primary>`` in its metrics, written by evaluation; ``baseline_floor``,
   on by default). With ``baseline_rule="bootstrap"`` (the default) and the paired
   bootstrap interval of candidate minus baseline in the metrics
   (``baseline_delta_<primary>_lo`` / ``_hi``, :func:`~recontrast_core.metrics.paired_bootstrap_delta`),
   it is refused only when the whole interval is below 0 (significantly worse); without
   the interval, or with ``baseline_rule="flat"``, when it is more than
   ``baseline_tolerance`` below the baseline. The floor **fails closed**: a candidate
   without ``baseline_<primary>`` is refused unless ``baseline_floor`` is False, and the
   reason then records that the floor was off;
3. there is no champion, or the candidate beats it on the primary metric by more than
   ``margin`` on the same evaluation data (the caller supplies champion metrics from the
   same data: ``mlops.registry`` re-evaluates the champion when needed);
4. no secondary metric is worse than the champion's by more than ``secondary_tolerance``.

Only metrics both models have are compared; all metrics are higher-is-better. On
normal-only evaluation data (no real anomalies, hence no AUROC) the primary metric falls
back to ``synthetic_image_auroc`` (its floor is the primary metric's), for the candidate,
the baseline (``baseline_synthetic_image_auroc``, ``baseline_delta_synthetic_image_auroc_lo``
/ ``_hi``) and the champion alike; a champion without it is not comparable and the
candidate is not promoted over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field
BASELINE_PREFIX = "baseline_"  # evaluation writes the baseline's metrics as baseline_<name>
# ... and the paired bootstrap interval of (model - baseline) as baseline_delta_<name>_lo/_hi
# (optionally its level as baseline_delta_<name>_confidence, e.g. 0.95).
BASELINE_DELTA_PREFIX = "baseline_delta_"
# Evaluation on normal-only data reports no AUROC; the rule then falls back to this one.
FALLBACK_PRIMARY = "synthetic_image_auroc"


class PromotionPolicy(BaseModel):
    """When a candidate may replace the champion (all metrics: higher is better)."""

    # allow_inf_nan=False: a NaN floor or margin would make every comparison false
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    floors: dict[str, float] = Field(default_factory=lambda: {"image_auroc": 0.7})
    primary_metric: str = "image_auroc"
    margin: float = Field(0.005, ge=0)
    # The candidate may not be worse than the training-free baseline on the primary metric
    # (evaluation reports the baseline beside every model). Fails closed: without the
    # baseline's metric the candidate is refused, unless baseline_floor is False.
    baseline_floor: bool = True
    # "bootstrap": refused only when the paired bootstrap interval of (candidate - baseline)
    # lies wholly below 0; without that interval in the metrics, or with "flat": refused
    # when more than baseline_tolerance below the baseline.
    baseline_rule: Literal["bootstrap", "flat"] = "bootstrap"
    baseline_tolerance: float = Field(0.02, ge=0)
    # Guard metrics: not worse than the champion's by more than secondary_tolerance.
    secondary_metrics: tuple[str, ...] = ()
    secondary_tolerance: float = Field(0.01, ge=0)

    def policy(self) -> "PromotionPolicy":
        """Just the rule (a subclass adds fields such as the model name)."""
        return PromotionPolicy.model_validate(self.model_dump(include=set(PromotionPolicy.model_fields)))

    def to_dict(self) -> dict[str, Any]:
        return self.policy().model_dump(mode="json")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def metric_value(metrics: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    """``metrics[key]`` as a float, or None when absent, not a number or NaN."""
    if not metrics or key not in metrics or metrics[key] is None or isinstance(metrics[key], bool):
        return None
    try:
        value = float(metrics[key])
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def baseline_delta_keys(metric: str) -> tuple[str, str]:
    """The metric keys of the paired bootstrap interval of (model - baseline) on ``metric``."""
    return f"{BASELINE_DELTA_PREFIX}{metric}_lo", f"{BASELINE_DELTA_PREFIX}{metric}_hi"


def _baseline_check(metrics: Mapping[str, Any], p: str, cand: float, policy: PromotionPolicy) -> Decision:
    """The baseline floor alone: ``promote=False`` refuses; otherwise ``reason`` is the note
    to append to the final reason."""
    if not policy.baseline_floor:
        return Decision(True, "; baseline floor off (registry.baseline_floor=false)")
    base_key = BASELINE_PREFIX + p
    base = metric_value(metrics, base_key)
    if base is None:
        return Decision(False, f"no training-free baseline ({base_key}) in the candidate's metrics: the "
                               "baseline floor fails closed; set registry.baseline_floor=false to skip it")
    delta = cand - base
    lo_key, hi_key = baseline_delta_keys(p)
    lo, hi = metric_value(metrics, lo_key), metric_value(metrics, hi_key)
    if policy.baseline_rule == "bootstrap" and lo is not None and hi is not None and lo <= hi:
        conf = metric_value(metrics, f"{BASELINE_DELTA_PREFIX}{p}_confidence")
        level = f"{conf * 100:g}% " if conf is not None and 0 < conf < 1 else ""
        interval = f"[{lo:+.3f}, {hi:+.3f}]"
        if hi < 0:  # the whole interval below 0: significantly worse than the baseline
            return Decision(False, f"below the training-free baseline: {p} {cand:.4f} vs baseline {base:.4f}, "
                                   f"delta {delta:+.4f}, {level}paired bootstrap interval {interval} "
                                   "(bootstrap rule: refused when the whole interval is below 0)")
        return Decision(True, f"; baseline delta {delta:+.3f} {interval} ({level}paired bootstrap)")
    if policy.baseline_rule == "bootstrap":
        rule = f"flat rule, no bootstrap interval ({lo_key}/_hi), tolerance {policy.baseline_tolerance:g}"
    else:
        rule = f"flat rule, tolerance {policy.baseline_tolerance:g}"
    if cand < base - policy.baseline_tolerance - 1e-9:
        return Decision(False, f"below the training-free baseline: {p} {cand:.4f} < baseline {base:.4f} "
                               f"(delta {delta:+.4f}; {rule})")
    return Decision(True, f"; baseline delta {delta:+.3f} ({rule})")


def decide_promotion(
    candidate_metrics: Mapping[str, Any],
    champion_metrics: Optional[Mapping[str, Any]],
    policy: PromotionPolicy = PromotionPolicy(),
) -> Decision:
    """Promote or not, and why.

    ``champion_metrics`` is None when there is no champion; otherwise it must come from
    the same evaluation data as ``candidate_metrics`` (the caller's job).
    """
    p = policy.primary_metric
    cand = metric_value(candidate_metrics, p)
    if cand is None and metric_value(candidate_metrics, FALLBACK_PRIMARY) is not None:
        # Normal-only evaluation data: no real anomalies, so no AUROC. Floors and comparison
        # then use what both models have: the AUROC against synthesised anomalies.
        p, cand = FALLBACK_PRIMARY, metric_value(candidate_metrics, FALLBACK_PRIMARY)
        floors = {FALLBACK_PRIMARY: policy.floors[policy.primary_metric]} if policy.primary_metric in policy.floors else {}
    else:
        floors = dict(policy.floors)
    if cand is None:
        return Decision(False, f"candidate has no {p}")
    for key, floor in sorted(floors.items()):
        value = metric_value(candidate_metrics, key)
        if value is None:
            return Decision(False, f"candidate has no {key} (floor {floor:g})")
        if value < floor:
            return Decision(False, f"below floor: {key} {value:.4f} < {floor:g}")
    baseline = _baseline_check(candidate_metrics, p, cand, policy)
    if not baseline.promote:
        return baseline
    decision = _versus_champion(candidate_metrics, champion_metrics, p, cand, policy)
    return Decision(decision.promote, decision.reason + baseline.reason)


def _versus_champion(candidate_metrics, champion_metrics, p: str, cand: float, policy: PromotionPolicy) -> Decision:
    if champion_metrics is None:
        return Decision(True, f"no champion; floors pass ({p} {cand:.4f})")
    champ = metric_value(champion_metrics, p)
    if champ is None:
        return Decision(False, f"champion has no {p} on this evaluation data; cannot compare")
    delta = cand - champ
    if delta <= policy.margin + 1e-9:  # exactly `margin` better is not better enough
        verdict = "within margin of" if delta > -policy.margin else "worse than"
        return Decision(
            False,
            f"{verdict} champion: {p} {cand:.4f} vs {champ:.4f} "
            f"(delta {delta:+.4f}, margin {policy.margin:g})",
        )
    for key in policy.secondary_metrics:
        c, ch = metric_value(candidate_metrics, key), metric_value(champion_metrics, key)
        if c is None or ch is None:
            continue
        if c < ch - policy.secondary_tolerance:
            return Decision(
                False,
                f"{p} better by {delta:+.4f} but {key} worse: {c:.4f} vs {ch:.4f} "
                f"(tolerance {policy.secondary_tolerance:g})",
            )
    return Decision(
        True, f"beats champion: {p} {cand:.4f} vs {champ:.4f} (delta {delta:+.4f} > {policy.margin:g})"
    )
