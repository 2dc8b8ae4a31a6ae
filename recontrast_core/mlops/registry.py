"""Gated promotion on MLflow's model registry, with aliases.

Aliases of a registered model (default name ``recontrast``):

* ``challenger``: the newest registered candidate (set by :func:`register_candidate`);
* ``champion``: the production model; it changes only through :func:`promote_if_better`
  (the gate), :func:`force_promote` (a person, with a reason) or :func:`rollback`;
* ``previous_champion``: the champion before the last promotion, the rollback target.

The rule itself lives in :mod:`recontrast_core.promotion` (pure); this adapter only
reads and writes MLflow. Champion metrics count only when measured on the same evaluation
data: its stored metrics when its ``dataset_fingerprint`` tag equals the candidate's,
otherwise it is re-evaluated on the candidate's evaluation set first
(``evaluate_champion_fn``, from the register step), and without that function the
candidate is not promoted.

A version's evaluation metrics are **metrics of its logged model** (MLflow 3's LoggedModel
behind ``models:/<model_id>``, e.g. the pyfunc of
:func:`recontrast_core.mlops.serving.pyfunc_model.log_pyfunc`): logged with ``model_id``
on the registering run, so the UI shows them on the model's page (and the run's), and
:func:`version_metrics` reads them back for the gate. A version without a logged model
(a bundle folder registered directly) keeps them as ``metric.<name>`` tags, the only place
such a version has; versions registered before this change are read from those tags too.

Version tags written here: ``pipeline_run_id``, ``dataset_fingerprint`` (plus the
caller's, e.g. ``model_kind``), ``promotion_decision`` (``promoted`` / ``rejected`` /
``forced`` / ``rolled_back``), ``promotion_reason``, ``compared_with_version``,
``demoted_by`` and ``rolled_back_from``. Retrying :func:`register_candidate` for the same
pipeline run returns the existing version.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional

from ..errors import UserError
from ..metrics import KEY_METRICS
from ..promotion import Decision, PromotionPolicy, decide_promotion, metric_value
from .registry_lock import LOCK_TAG, RegistryBusy, model_lock  # noqa: F401  (LOCK_TAG, RegistryBusy: for callers)
from .registry_lookup import (  # noqa: F401  (download_bundle: for callers, registry.download_bundle)
    all_versions,
    alias_version,
    download_bundle,
    get_client,
    get_registered_model,
    get_version,
    is_not_found,
)

DEFAULT_MODEL_NAME = "recontrast"
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous_champion"
METRIC_TAG_PREFIX = "metric."

TAG_PIPELINE_RUN_ID = "pipeline_run_id"
TAG_FINGERPRINT = "dataset_fingerprint"
TAG_DECISION = "promotion_decision"
TAG_REASON = "promotion_reason"
TAG_COMPARED_WITH = "compared_with_version"


# ---------------------------------------------------------------------------------------
# versions and their metrics (reading the registry: registry_lookup.py)
# ---------------------------------------------------------------------------------------
def ensure_registered_model(client, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
        return
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
    try:
        client.create_registered_model(
            model_name, description="ReContrast visual anomaly detector (recontrast)"
        )
    except MlflowException as exc:  # created concurrently
        if "ALREADY_EXISTS" not in (getattr(exc, "error_code", "") or ""):
            raise


def version_metrics(client, mv) -> dict[str, float]:
    """The evaluation metrics of a version: its logged model's metrics (the newest value of
    each), else its ``metric.*`` tags (a version without a logged model, or one registered
    before metrics moved to the logged model), else its run's metrics."""
    from mlflow.exceptions import MlflowException

    model_id = version_model_id(mv)
    if model_id:
        try:
            out = logged_model_metrics(client, model_id)
        except MlflowException as exc:
            if not is_not_found(exc):
                raise  # a server error is not "no metrics"
            out = {}  # the logged model was deleted: try the tags
        if out:
            return out
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                out[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                pass
    if not out and mv.run_id:
        try:
            out = dict(client.get_run(mv.run_id).data.metrics)
        except MlflowException as exc:
            if not is_not_found(exc):
                raise  # a server error is not "no metrics"
            out = {}  # the run was deleted: the version has no metrics to compare
    return out


def version_model_id(mv) -> Optional[str]:
    """The id of a version's logged model, or None. ``mv.model_id`` where the store returns it
    (MLflow 3.17's REST API drops it from the version it returns), else its
    ``models:/<model_id>`` source."""
    model_id = getattr(mv, "model_id", None)
    if model_id:
        return str(model_id)
    return _uri_model_id(str(getattr(mv, "source", "") or ""))


def _uri_model_id(uri: str) -> Optional[str]:
    """The logged model id of a ``models:/<model_id>[/...]`` URI (ids start with ``m-``), else None."""
    if uri.startswith("models:/m-"):
        return uri[len("models:/") :].split("/")[0]
    return None


def logged_model_metrics(client, model_id: str) -> dict[str, float]:
    """``{name: value}`` of a logged model's metrics, the newest (step, time) of each."""
    newest: dict[str, tuple] = {}
    for m in client.get_logged_model(model_id).metrics or []:
        rank = (m.step or 0, m.timestamp or 0)
        if m.key not in newest or rank >= newest[m.key][0]:
            newest[m.key] = (rank, float(m.value))
    return {key: value for key, (_, value) in newest.items()}


def log_model_metrics(client, run_id: str, model_id: str, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` as metrics of the logged model ``model_id`` (through ``run_id``:
    MLflow keeps a model's metrics with the run that logged them)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, 0, model_id=model_id) for key, value in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def find_version_for_pipeline_run(client, model_name: str, pipeline_run_id: str):
    for mv in all_versions(client, model_name):
        if (mv.tags or {}).get(TAG_PIPELINE_RUN_ID) == pipeline_run_id:
            return mv
    return None


# ---------------------------------------------------------------------------------------
# what a serial history guarantees (the lock that serialises writers: registry_lock.py)
# ---------------------------------------------------------------------------------------
def check_invariants(client, model_name: str) -> list[str]:
    """What a serial history guarantees, read back from the registry (empty = all hold):
    the champion, challenger and previous champion are distinct versions; the previous
    champion was replaced by the champion (``demoted_by``) or by a version later rolled
    back; a forced champion is never the previous champion's successor skipped by a rollback."""
    problems = []
    aliases = {a: str(v) for a, v in (getattr(get_registered_model(client, model_name), "aliases", None) or {}).items()}
    champion, previous = aliases.get(CHAMPION), aliases.get(PREVIOUS_CHAMPION)
    challenger = aliases.get(CHALLENGER)
    if challenger is not None and challenger == champion:
        problems.append(f"challenger and champion are the same version {champion}")
    if previous is not None:
        if champion is None:
            problems.append(f"previous_champion v{previous} without a champion")
        elif previous == champion:
            problems.append(f"previous_champion is the champion v{champion}")
        else:
            demoted_by = (client.get_model_version(model_name, previous).tags or {}).get("demoted_by")
            if demoted_by != champion:
                problems.append(f"previous_champion v{previous} was replaced by v{demoted_by}, "
                                f"not by the champion v{champion}")
    if champion is not None:
        tags = client.get_model_version(model_name, champion).tags or {}
        if tags.get(TAG_DECISION) not in ("promoted", "forced", None) and "rolled_back_from" not in tags:
            problems.append(f"champion v{champion} is tagged {tags.get(TAG_DECISION)!r}")
    return problems


def _verify(client, model_name: str, action: str) -> None:
    problems = check_invariants(client, model_name)
    if problems:
        raise UserError(f"{model_name}: after {action} the registry breaks its invariants: "
                        + "; ".join(problems) + " (run `recontrast registry status` and fix the aliases by hand)")


# ---------------------------------------------------------------------------------------
# register, promote, roll back
# ---------------------------------------------------------------------------------------
def register_candidate(
    run_id: str,
    model_name: str,
    pipeline_run_id: str,
    metrics: Mapping[str, Any],
    fingerprint: str,
    *,
    model_uri: Optional[str] = None,
    artifact_path: str = "model",
    tags: Optional[Mapping[str, Any]] = None,
    client=None,
) -> str:
    """Register the run's model as a new version, alias ``challenger``; returns the version.

    Idempotent per pipeline run: when a version tagged with ``pipeline_run_id`` exists,
    it is returned (aliased ``challenger`` if no decision was taken on it yet) and no new
    version is created. ``model_uri`` defaults to ``runs:/<run_id>/<artifact_path>``.
    """
    client = client or get_client()
    ensure_registered_model(client, model_name)
    with model_lock(client, model_name):
        return _register_locked(client, run_id, model_name, pipeline_run_id, metrics, fingerprint,
                                model_uri, artifact_path, tags)


def _register_locked(client, run_id, model_name, pipeline_run_id, metrics, fingerprint, model_uri, artifact_path,
                     tags) -> str:
    existing = find_version_for_pipeline_run(client, model_name, pipeline_run_id)
    if existing is not None:
        if TAG_DECISION not in (existing.tags or {}):
            client.set_registered_model_alias(model_name, CHALLENGER, existing.version)
        return str(existing.version)
    from .redaction import redact_tags

    version_tags: dict[str, Any] = {
        TAG_PIPELINE_RUN_ID: pipeline_run_id,
        TAG_FINGERPRINT: fingerprint,
    }
    numeric = {key: num for key, value in metrics.items()
               if (num := metric_value(metrics, key)) is not None and not isinstance(value, bool)}
    source, model_id = _resolve_source(client, model_uri or f"runs:/{run_id}/{artifact_path}")
    if model_id is not None:  # before the version exists: a version never lacks its metrics
        log_model_metrics(client, run_id, model_id, numeric)
    else:  # no logged model to carry them: the version's tags (module doc)
        version_tags.update({METRIC_TAG_PREFIX + key: repr(num) for key, num in numeric.items()})
    version_tags.update(tags or {})
    mv = client.create_model_version(model_name, source, run_id=run_id, tags=redact_tags(version_tags),
                                     await_creation_for=60, model_id=model_id)
    client.set_registered_model_alias(model_name, CHALLENGER, mv.version)
    return str(mv.version)


def _resolve_source(client, source: str) -> tuple[str, Optional[str]]:
    """A model version's source and logged model id (or None) for ``source``.

    ``runs:/<run>/<name>`` resolves like ``mlflow.register_model``: to the MLflow 3
    LoggedModel called ``<name>`` on the run (``models:/<model_id>``, e.g. the pyfunc
    from :func:`recontrast_core.mlops.serving.pyfunc_model.log_pyfunc`), else to the run's artifact
    directory ``<name>`` (e.g. a bundle logged with ``tracking.log_bundle``).
    """
    if not source.startswith("runs:/"):
        return source, _uri_model_id(source)
    rid, _, rel = source[len("runs:/") :].partition("/")
    run = client.get_run(rid)
    model_id = _logged_model_id(client, run, rel)
    if model_id is not None:
        return f"models:/{model_id}", model_id
    artifact_root = run.info.artifact_uri.rstrip("/")
    return (f"{artifact_root}/{rel}" if rel else artifact_root), None


def _logged_model_id(client, run, name: str) -> Optional[str]:
    """The id of the newest LoggedModel named ``name`` output by the run, or None."""
    outputs = getattr(getattr(run, "outputs", None), "model_outputs", None) or []
    best = None
    for out in outputs:
        try:
            lm = client.get_logged_model(out.model_id)
        except Exception:
            continue
        if lm.name == name and (best is None or out.step >= best[0]):
            best = (out.step, lm.model_id)
    return best[1] if best else None


def _set_tags(client, model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, str(value)[:5000])


def _move_champion(client, model_name: str, version: str, current) -> None:
    """current champion -> previous_champion, ``version`` -> champion."""
    if current is not None and str(current.version) != str(version):
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, current.version)
        _set_tags(client, model_name, current.version, {"demoted_by": version})
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    challenger = alias_version(client, model_name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        client.delete_registered_model_alias(model_name, CHALLENGER)


def promote_if_better(
    client,
    model_name: str,
    version: str,
    policy: PromotionPolicy = PromotionPolicy(),
    evaluate_champion_fn: Optional[Callable[[Any], Mapping[str, Any]]] = None,
) -> Decision:
    """Run the gate for ``version`` and move the aliases when it passes.

    ``evaluate_champion_fn(champion_model_version) -> metrics`` re-evaluates the current
    champion on the candidate's evaluation set; it is called only when the champion's
    ``dataset_fingerprint`` differs from the candidate's (outside the model's lock: it can
    take minutes; if the champion changed meanwhile, the gate runs again). The decision and
    the reason are written to the candidate's tags either way, under the lock.
    """
    client = client or get_client()
    version = str(version)
    reevaluated: dict[str, dict] = {}
    for _ in range(5):
        with model_lock(client, model_name):
            champion = alias_version(client, model_name, CHAMPION)
            needs = _needs_reevaluation(client, model_name, version, champion, evaluate_champion_fn)
            if needs is None or needs in reevaluated:
                decision = _gate_locked(client, model_name, version, champion, policy, reevaluated.get(needs or ""))
                _verify(client, model_name, f"the gate for v{version}")
                return decision
        reevaluated[needs] = dict(evaluate_champion_fn(champion))  # type: ignore[misc]
    raise UserError(f"{model_name}: the champion kept changing while v{version} was being gated; try again")


def _needs_reevaluation(client, model_name, version, champion, evaluate_champion_fn) -> Optional[str]:
    """The champion version to re-evaluate first, or None."""
    if champion is None or str(champion.version) == version or evaluate_champion_fn is None:
        return None
    cand_fp = (client.get_model_version(model_name, version).tags or {}).get(TAG_FINGERPRINT)
    champ_fp = (champion.tags or {}).get(TAG_FINGERPRINT)
    return None if cand_fp and champ_fp == cand_fp else str(champion.version)


def _gate_locked(client, model_name: str, version: str, champion, policy: PromotionPolicy,
                 reevaluated: Optional[dict]) -> Decision:
    cand = client.get_model_version(model_name, version)
    cand_metrics = version_metrics(client, cand)
    cand_fp = (cand.tags or {}).get(TAG_FINGERPRINT)
    if champion is not None and str(champion.version) == version:
        return Decision(False, f"version {version} is already the champion")

    champ_metrics = None
    extra: dict[str, Any] = {}
    if champion is not None:
        extra[TAG_COMPARED_WITH] = champion.version
        champ_fp = (champion.tags or {}).get(TAG_FINGERPRINT)
        if cand_fp and champ_fp == cand_fp:
            champ_metrics = version_metrics(client, champion)
        elif reevaluated is None:
            decision = Decision(
                False,
                f"champion v{champion.version} was evaluated on other data "
                f"(fingerprint {str(champ_fp)[:12]} != {str(cand_fp)[:12]}) and no "
                "re-evaluation function was given",
            )
            _record(client, model_name, version, decision, extra)
            return decision
        else:
            champ_metrics = reevaluated
            extra["champion_reevaluated_on"] = cand_fp
            _set_tags(
                client,
                model_name,
                champion.version,
                {
                    f"reeval.{str(cand_fp)[:16]}": json.dumps(
                        {k: v for k, v in champ_metrics.items() if metric_value(champ_metrics, k) is not None}
                    )
                },
            )
        if champ_metrics is not None:
            p = policy.primary_metric
            if metric_value(champ_metrics, p) is not None:
                extra[f"champion_{p}"] = champ_metrics[p]

    decision = decide_promotion(cand_metrics, champ_metrics, policy)
    if decision.promote:
        _move_champion(client, model_name, version, champion)
    _record(client, model_name, version, decision, extra)
    return decision


def _record(client, model_name: str, version: str, decision: Decision, extra: Mapping[str, Any]):
    _set_tags(
        client,
        model_name,
        version,
        {
            TAG_DECISION: "promoted" if decision.promote else "rejected",
            TAG_REASON: decision.reason,
            **extra,
        },
    )


def force_promote(
    model_name: str, version: str, reason: str, *, client=None
) -> Decision:
    """Make ``version`` the champion without the gate (a person's decision, with a reason)."""
    if not reason or not reason.strip():
        raise UserError("a forced promotion needs a --reason")
    client = client or get_client()
    version = str(version)
    get_version(client, model_name, version)
    with model_lock(client, model_name):
        champion = alias_version(client, model_name, CHAMPION)
        if champion is not None and str(champion.version) == version:
            return Decision(False, f"version {version} is already the champion")
        _move_champion(client, model_name, version, champion)
        decision = Decision(True, f"forced: {reason.strip()}")
        _set_tags(client, model_name, version, {TAG_DECISION: "forced", TAG_REASON: decision.reason})
        _verify(client, model_name, f"forcing v{version}")
    return decision


def promote_decided(model_name: str, version: str, decision: Decision, expected_champion: Optional[str], *,
                    tags: Optional[dict] = None, client=None) -> Decision:
    """Apply a decision taken outside the comparison gate (a recalibration's FPR gate) under
    the model's lock: when it promotes and the champion is still ``expected_champion``, move
    the champion; otherwise (the champion moved meanwhile) register only. The decision, its
    reason and ``tags`` are recorded on the version either way. Returns what was applied."""
    client = client or get_client()
    version = str(version)
    get_version(client, model_name, version)
    with model_lock(client, model_name):
        champion = alias_version(client, model_name, CHAMPION)
        now = str(champion.version) if champion is not None else None
        if decision.promote and now != (str(expected_champion) if expected_champion is not None else None):
            decision = Decision(False, f"the champion changed to v{now or '?'} while v{version} was decided on; "
                                       "registered only")
        if decision.promote:
            _move_champion(client, model_name, version, champion)
        _set_tags(client, model_name, version, {TAG_DECISION: "promoted" if decision.promote else "rejected",
                                                TAG_REASON: decision.reason, **(tags or {}),
                                                **({TAG_COMPARED_WITH: now} if now is not None else {})})
        if decision.promote:
            _verify(client, model_name, f"promoting v{version}")
    return decision


def rollback(model_name: str = DEFAULT_MODEL_NAME, *, reason: str = "", client=None) -> dict:
    """``champion`` <- ``previous_champion``. The demoted version is tagged
    ``promotion_decision=rolled_back``; ``previous_champion`` is removed (a second rollback
    needs a new promotion in between). Returns ``{"champion", "demoted"}``."""
    client = client or get_client()
    get_registered_model(client, model_name)
    with model_lock(client, model_name):
        result = _rollback_locked(client, model_name, reason)
        _verify(client, model_name, "the rollback")
    return result


def _rollback_locked(client, model_name: str, reason: str) -> dict:
    previous = alias_version(client, model_name, PREVIOUS_CHAMPION)
    if previous is None:
        raise UserError(f"{model_name}: no previous_champion to roll back to")
    current = alias_version(client, model_name, CHAMPION)
    client.set_registered_model_alias(model_name, CHAMPION, previous.version)
    client.delete_registered_model_alias(model_name, PREVIOUS_CHAMPION)
    if current is not None:
        _set_tags(
            client,
            model_name,
            current.version,
            {
                TAG_DECISION: "rolled_back",
                TAG_REASON: f"rolled back to v{previous.version}"
                + (f": {reason}" if reason else ""),
            },
        )
    _set_tags(
        client,
        model_name,
        previous.version,
        {"rolled_back_from": current.version if current is not None else ""},
    )
    return {
        "champion": str(previous.version),
        "demoted": str(current.version) if current is not None else None,
    }


def status(model_name: str = DEFAULT_MODEL_NAME, *, client=None) -> dict:
    """Aliases, versions and their key metrics, as a JSON-able dict."""
    client = client or get_client()
    rm = get_registered_model(client, model_name)
    aliases = {a: str(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)
    versions = []
    for mv in all_versions(client, model_name):
        tags = mv.tags or {}
        m = version_metrics(client, mv)
        versions.append(
            {
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "run_id": mv.run_id,
                "created": mv.creation_timestamp,
                TAG_PIPELINE_RUN_ID: tags.get(TAG_PIPELINE_RUN_ID),
                TAG_FINGERPRINT: tags.get(TAG_FINGERPRINT),
                "metrics": {k: m[k] for k in KEY_METRICS if k in m} or m,
                "decision": tags.get(TAG_DECISION),
                "reason": tags.get(TAG_REASON),
            }
        )
    return {"model_name": model_name, "aliases": aliases, "versions": versions}
