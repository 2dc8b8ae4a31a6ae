"""The fleet: every product line's champion at a glance (``recontrast registry status --all``).

A line's registered model is ``recontrast-<line>`` (``recontrast`` without a line;
:func:`recontrast_core.config.line_names`). Per line: the champion version, its model kind
(the ``model_kind`` version tag), the primary metric (``image_auroc``, else
``synthetic_image_auroc`` for normal-only data), its age (since the version was registered),
the last drift-monitor verdict of the champion version, the number of versions and the
challenger. Read only.

The monitor verdict: the champion version's ``monitor_verdict`` tag (with
``monitor_verdict_at``) where the monitor sets it; otherwise the newest window run of the
drift monitor (``recontrast monitor``: one MLflow run per window, tags ``monitor.verdict``,
``monitor.model_version``, ``monitor.window_end``) for that version, in the line's monitor
experiment (``recontrast-<line>-monitor``) or the default one (``recontrast-monitor``).
"""

from __future__ import annotations

import time
from typing import Optional

from ..config import DEFAULT_NAME, line_names
from ..promotion import FALLBACK_PRIMARY, PromotionPolicy, metric_value
from .registry_lookup import alias_version, all_versions

TAG_MONITOR_VERDICT = "monitor_verdict"
TAG_MONITOR_VERDICT_AT = "monitor_verdict_at"
TAG_MODEL_KIND = "model_kind"


def line_of(model_name: str) -> Optional[str]:
    """``recontrast-<line>`` -> ``<line>``; ``recontrast`` -> None (no line)."""
    return model_name[len(DEFAULT_NAME) + 1:] if model_name.startswith(DEFAULT_NAME + "-") else None


def fleet_models(client) -> list[str]:
    """The registered models named like a line's (``recontrast``, ``recontrast-*``), sorted."""
    names, token = [], None
    while True:
        page = client.search_registered_models(filter_string=f"name LIKE '{DEFAULT_NAME}%'", max_results=200,
                                               page_token=token)
        names += [rm.name for rm in page if rm.name == DEFAULT_NAME or rm.name.startswith(DEFAULT_NAME + "-")]
        token = getattr(page, "token", None)
        if not token:
            break
    return sorted(set(names))


def human_age(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            rest = s % size
            nxt = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            return f"{s // size}{unit}" + (f" {rest // nxt[1]}{nxt[0]}" if rest // nxt[1] else "")
    return f"{s}s"


def fleet_status(client, policy: PromotionPolicy = PromotionPolicy(), now: Optional[float] = None) -> list[dict]:
    """One row per line (module doc), JSON-able."""
    from .registry import version_metrics

    now = time.time() if now is None else now
    rows = []
    for name in fleet_models(client):
        champion = alias_version(client, name, "champion")
        challenger = alias_version(client, name, "challenger")
        row = {"line": line_of(name), "model_name": name, "versions": len(all_versions(client, name)),
               "champion": None, "model_kind": None, "primary_metric": None, "primary_value": None,
               "age_s": None, "age": "", "monitor_verdict": None, "monitor_verdict_at": None,
               "challenger": str(challenger.version) if challenger is not None else None}
        if champion is not None:
            tags = champion.tags or {}
            metrics = version_metrics(client, champion)
            primary = policy.primary_metric
            if metric_value(metrics, primary) is None and metric_value(metrics, FALLBACK_PRIMARY) is not None:
                primary = FALLBACK_PRIMARY
            created = getattr(champion, "creation_timestamp", None)
            age = now - created / 1000.0 if created else None
            row.update(champion=str(champion.version), model_kind=tags.get(TAG_MODEL_KIND),
                       primary_metric=primary, primary_value=metric_value(metrics, primary),
                       age_s=round(age, 1) if age is not None else None, age=human_age(age),
                       monitor_verdict=tags.get(TAG_MONITOR_VERDICT),
                       monitor_verdict_at=tags.get(TAG_MONITOR_VERDICT_AT))
            if row["monitor_verdict"] is None:
                row["monitor_verdict"], row["monitor_verdict_at"] = monitor_run_verdict(
                    client, name, str(champion.version))
        rows.append(row)
    return rows


def monitor_run_verdict(client, model_name: str, version: str) -> tuple[Optional[str], Optional[str]]:
    """``(verdict, window end)`` of the newest drift-monitor window run for ``model_name``
    version ``version`` (module doc), or ``(None, None)``."""
    names = dict.fromkeys([line_names(line_of(model_name))["monitor_experiment"],
                           line_names(None)["monitor_experiment"]])
    ids = [e.experiment_id for e in (client.get_experiment_by_name(n) for n in names) if e is not None]
    if not ids:
        return None, None
    runs = client.search_runs(ids, filter_string=f"tags.`monitor.model_version` = '{model_name}/{version}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None, None
    tags = runs[0].data.tags
    return tags.get("monitor.verdict"), tags.get("monitor.window_end") or None
