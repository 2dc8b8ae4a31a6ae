"""recalibrate: a registered model (or a bundle) + new normal images -> a new version with a
new threshold and normalisation and the same weights, through the recalibration gate.

The core (:mod:`recontrast_core.recalibrate`) scores the normals, fits the calibration with
the training rule and writes the new bundle (weights hard-linked, only ``bundle.json``'s
``calibration`` changed). This step adds the registry: the new bundle is logged as the
pyfunc model of a ``recalibrate`` run and registered as a new version of the parent's
registered model (alias ``challenger``), with the parent's evaluation metrics (the weights
did not change), the recalibration's own numbers, lineage tags and the gate's decision
(:func:`~recontrast_core.recalibrate.decide_recalibration`); when the gate passes and the
parent is still the champion, the new version becomes the champion.

Version tags: ``recalibrated_from`` (the parent version, or ``bundle:<digest>``),
``recalibrated_from_uri``, ``recalibration_images`` (count), ``recalibration_images_sha256``,
``recalibration_target_fpr``, ``recalibration_decision`` / ``recalibration_reason``, the
standard ``promotion_decision`` / ``promotion_reason`` (``promotion_rule: recalibration``)
and ``model_kind``; the run holds ``recalibration/recalibration.json`` (the image list).
Idempotent: the same parent, images and target FPR give the same version.

A step record like the others, KFP-only (no DVC stage: it changes a registered model, it
does not build one): the component ``recalibrate_op`` takes ``model_uri`` and
``normals_uri`` (a folder the pod sees or an ``s3://`` prefix).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..bundle import DEFAULT_KIND, read_bundle_meta
from ..config import PipelineConfig
from ..data.manifest import Manifest
from ..promotion import Decision
from ..recalibrate import DEFAULT_MIN_NORMALS, decide_recalibration, recalibrate_bundle, write_record
from ..runtime import atomic_write_json
from .artifacts import PathLike, load_manifest
from .records import Port, StepRecord, component_run_id, register_step
from .tracked import step_tracking

RESULT_FILE = "recalibrate.json"
PROMOTION_RULE_TAG = "promotion_rule"
_REGISTERED = re.compile(r"^(?P<name>[^/]+)/(?P<version>\d+)$")


def normal_images(normals: Sequence[Union[str, PathLike]], scratch: Path) -> list[Path]:
    """Image files of ``normals`` (files, folders walked recursively, ``s3://`` prefixes
    downloaded into ``scratch``), sorted within each input."""
    from ..predict import expand_inputs

    local: list[Union[str, Path]] = []
    for i, item in enumerate(normals):
        text = str(item)
        if text.startswith("s3://"):
            from ..mlops.storage import download_s3_prefix

            dest = scratch / f"normals-{i}"
            download_s3_prefix(text, dest)  # its .s3-index.json: a dot file, not listed
            local.append(dest)
        else:
            local.append(text)
    return expand_inputs(local)


def recalibrate(
    model_uri: str,
    normals: Sequence[Union[str, PathLike]],
    out_dir: PathLike,
    settings: PipelineConfig = PipelineConfig(),
    *,
    eval_manifest: Union[PathLike, Manifest, None] = None,
    min_normals: int = DEFAULT_MIN_NORMALS,
    register: bool = True,
    pipeline_run_id: Optional[str] = None,
    device: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Recalibrate ``model_uri`` (a bundle folder, ``s3://`` bundle, ``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION`` or ``runs:/``) on ``normals`` into ``out_dir`` and, with
    ``register``, register the result through the gate. ``settings``: ``calibration.target_fpr``
    (the rule), ``registry`` (the model name for a non-registry parent, the floors),
    ``tracking``, ``train.device``. ``eval_manifest``: labelled data to check the floors on.
    Returns the summary written to ``out_dir/recalibrate.json``."""
    from ..mlops.model_source import resolve_model

    target_fpr = settings.calibration.target_fpr
    tracking = settings.tracking
    device = device or settings.train.device
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="recontrast-recalibrate-") as tmp:
        scratch = Path(tmp)
        paths = normal_images(normals, scratch)
        manifest = load_manifest(eval_manifest) if eval_manifest is not None else None
        model = resolve_model(str(model_uri), scratch / "model", tracking.tracking_uri or None)
        m = _REGISTERED.match(model.version)
        parent_name, parent_version = (m["name"], m["version"]) if m else (None, None)
        parent = {"uri": model.uri, "version": model.version}
        result = recalibrate_bundle(model.bundle_dir, paths, out, target_fpr=target_fpr, device=device,
                                    progress=progress, parent=parent)
        labelled: dict[str, Any] = {}
        fingerprint_eval = None
        if manifest is not None:
            from ..evaluate import evaluate_bundle

            payload = evaluate_bundle(result.bundle_dir, manifest, progress=progress, device=device, synthetic=False)
            labelled = {k: v for k, v in payload["metrics"].items() if isinstance(v, (int, float))}
            fingerprint_eval = payload.get("dataset_fingerprint") or manifest.with_hashes().fingerprint
    summary: dict[str, Any] = {
        "bundle": str(result.bundle_dir), "parent": model.version, "parent_uri": model.uri,
        "n_images": result.n_images, "images_sha256": result.images_sha256, "target_fpr": target_fpr,
        "threshold": result.calibration.threshold, "parent_threshold": result.parent_calibration.threshold,
        "fpr": result.fpr, "parent_fpr": result.parent_fpr, "seconds": round(result.seconds, 2),
        "labelled_metrics": labelled or None,
    }
    if register:  # records the decision in recalibration.json (logged with the run)
        summary.update(_register(result, settings, parent_name, parent_version, labelled, fingerprint_eval,
                                 min_normals, pipeline_run_id, device))
    else:
        decision = decide_recalibration(result.fpr, result.n_images, target_fpr, min_normals=min_normals,
                                        labelled_metrics=labelled, policy=settings.registry.policy(),
                                        parent=model.version)
        summary.update(registered=False, promoted=False, decision="not registered", reason=decision.reason,
                       gate_passed=decision.promote)
        result.decision = {"promote": decision.promote, "reason": decision.reason, "registered": False}
        write_record(out, result)
    atomic_write_json(out / RESULT_FILE, summary)
    return summary


def _register(result, settings: PipelineConfig, parent_name: Optional[str], parent_version: Optional[str],
              labelled: dict, fingerprint_eval: Optional[str], min_normals: int, pipeline_run_id: Optional[str],
              device: str) -> dict:
    from ..mlops import registry
    from ..mlops import tracking as mlflow_tracking

    tracking = settings.tracking
    target_fpr = settings.calibration.target_fpr
    name = parent_name or settings.registry.model_name
    client = mlflow_tracking.get_client(tracking.tracking_uri or None)
    parent_mv = registry.get_version(client, name, parent_version) if parent_version else None
    parent_tags = dict(parent_mv.tags or {}) if parent_mv is not None else {}
    parent_label = f"v{parent_version}" if parent_version else result.parent["version"]
    metrics = dict(registry.version_metrics(client, parent_mv)) if parent_mv is not None else {}
    metrics.update(labelled)
    metrics.update(result.metrics())
    fingerprint = fingerprint_eval or parent_tags.get(registry.TAG_FINGERPRINT) or ""
    champion = registry.alias_version(client, name, registry.CHAMPION)  # None: no model or no champion yet
    is_champion = (champion is None and parent_mv is None) or (
        champion is not None and parent_version is not None and str(champion.version) == str(parent_version))
    decision = decide_recalibration(result.fpr, result.n_images, target_fpr, min_normals=min_normals,
                                    labelled_metrics=labelled, policy=settings.registry.policy(),
                                    parent_is_champion=is_champion,
                                    parent=f"{name} {parent_label}" if parent_version else parent_label)
    pid = pipeline_run_id or (f"recalibrate-{name}-{parent_version or result.parent['version'].replace(':', '-')}"
                              f"-{result.images_sha256[:12]}-fpr{target_fpr:g}")
    tags = {
        "model_kind": str(read_bundle_meta(result.bundle_dir).get("model_kind", DEFAULT_KIND)),
        "recalibrated_from": parent_version or result.parent["version"],
        "recalibrated_from_uri": result.parent["uri"],
        "recalibration_images": str(result.n_images),
        "recalibration_images_sha256": result.images_sha256,
        "recalibration_target_fpr": f"{target_fpr:g}",
        "recalibration_decision": "passed" if decision.promote else "failed",
        "recalibration_reason": decision.reason,
    }
    with step_tracking("recalibrate", pid, tracking, params={"calibration": settings.calibration,
                                                             "min_normals": min_normals},
                       dataset_fingerprint=fingerprint or None) as run_id:
        existing = registry.find_version_for_pipeline_run(client, name, pid)
        if existing is not None:
            model_uri = existing.source
        else:
            from ..mlops.serving.pyfunc_model import log_pyfunc

            model_uri = log_pyfunc(result.bundle_dir, name="model", run_id=run_id, device=device).model_uri
        version = registry.register_candidate(run_id, name, pid, metrics, fingerprint, model_uri=model_uri,
                                              tags=tags, client=client)
        version_tags = client.get_model_version(name, version).tags or {}
        recorded = version_tags.get(registry.TAG_DECISION)
        if recorded is not None:  # a retry after the gate already ran: report, don't redo
            decision = Decision(recorded in ("promoted", "forced"), version_tags.get(registry.TAG_REASON, ""))
            label = recorded
        else:
            # the weights are the champion's (the gate checked the FPR): no comparison of ranking
            # metrics; the champion moves only if it is still the one recalibrated (under the lock)
            decision = registry.promote_decided(name, str(version), decision,
                                                str(champion.version) if champion is not None else None,
                                                tags={PROMOTION_RULE_TAG: "recalibration"}, client=client)
            label = "promoted" if decision.promote else "rejected"
        result.decision = {"promote": decision.promote, "reason": decision.reason, "registered": True,
                           "model_name": name, "version": str(version)}
        record = write_record(result.bundle_dir.parent, result)
        if recorded is None:
            client.log_artifact(run_id, str(record), "recalibration")
        mlflow_tracking.set_tags({"registered_version": version, "promotion_decision": label,
                                  "recalibrated_from": tags["recalibrated_from"]}, run_id)
        mlflow_tracking.log_metrics({f"recalibrate/{k}": v for k, v in result.metrics().items()}, run_id)
    mlflow_tracking.end_pipeline_run(pid, "FINISHED", experiment=tracking.experiment,
                                     tracking_uri=tracking.tracking_uri or None)
    aliases = registry.status(name, client=client)["aliases"]
    return {"registered": True, "model_name": name, "version": str(version), "promoted": bool(decision.promote),
            "decision": label, "reason": decision.reason, "champion": aliases.get(registry.CHAMPION),
            "pipeline_run_id": pid, "run_id": run_id, "model_uri": model_uri}


# ----------------------------------------------------------------------------- its record
def _component(v: dict) -> tuple:
    from .settings import apply_overrides

    out = Path(v["bundle"].path)
    result = recalibrate(v["model_uri"], [v["normals_uri"]], out, apply_overrides(v["settings"]),
                         min_normals=v["min_normals"], pipeline_run_id=component_run_id(v), progress=False)
    return (bool(result.get("promoted")), str(result.get("version") or ""), str(result.get("decision")),
            json.dumps(result, default=str))


RECORD = register_step(StepRecord(
    name="recalibrate",
    summary="A new threshold and normalisation for ``model_uri`` from the normal images under ``normals_uri`` "
            "(same weights); registered as a new version through the recalibration gate. ``result`` is the "
            "summary JSON; the new bundle and recalibration.json are the ``bundle`` output.",
    run=recalibrate, sections=("calibration", "registry", "tracking", "train.device"),
    cli=None, component=_component,
    kfp_params=(("model_uri", str), ("normals_uri", str), ("min_normals", int)),
    outputs=(Port("bundle", "Model"),),
    returns=(("promoted", bool), ("version", str), ("decision", str), ("result", str)),
))
