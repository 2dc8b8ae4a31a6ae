"""register: log the bundle as an MLflow pyfunc model, register it (alias ``challenger``)
and run the promotion gate (:mod:`recontrast_core.promotion`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..config import PipelineConfig
from ..data.manifest import Manifest
from ..errors import UserError
from ..evaluate import evaluate_bundle
from ..mlops import registry
from ..mlops import tracking as mlflow_tracking
from ..mlops.redaction import redact_uri
from ..promotion import Decision
from ..runtime import atomic_write_json, read_json, require_complete
from .artifacts import METRICS_FILE, PathLike, bundle_run_id, find_bundle_dir, load_manifest
from .records import DvcStage, Port, StepRecord, component_run_id, register_step
from .tracked import step_tracking

ENV_PIPELINE_RUN_ID = "RECONTRAST_PIPELINE_RUN_ID"


def champion_reevaluator(client, model_name: str, manifest: Manifest, device: str = "auto") -> Callable[[Any], dict]:
    """An ``evaluate_champion_fn`` for the gate: downloads the champion's bundle and
    evaluates it on ``manifest`` (the candidate's evaluation data; no baseline needed)."""

    def _evaluate(champion_mv) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            bundle_dir = registry.download_bundle(client, model_name, champion_mv, tmp)
            payload = evaluate_bundle(bundle_dir, manifest, progress=False, device=device)
        return dict(payload["metrics"])

    return _evaluate


def register(
    bundle_dir: PathLike,
    metrics_path: PathLike,
    settings: PipelineConfig = PipelineConfig(),
    *,
    manifest: Union[PathLike, Manifest, None] = None,
    pipeline_run_id: Optional[str] = None,
    device: Optional[str] = None,
    out_path: Optional[PathLike] = None,
    end_pipeline: bool = True,
) -> dict:
    """Register the bundle and run the gate (``settings.registry``: model name and rule).

    ``manifest`` lets the gate re-evaluate the champion when it was evaluated on other
    data. Idempotent per ``pipeline_run_id`` (a retried step returns the same version and
    decision; without an id, one derived from the bundle's content). Returns
    ``{"model_name", "version", "promoted", "decision", "reason", "champion",
    "challenger", "previous_champion", "pipeline_run_id", "run_id", "model_uri",
    "tracking_uri"}`` and writes it to ``out_path`` when given.
    """
    cfg, tracking = settings.registry, settings.tracking
    name = cfg.model_name
    device = device or settings.train.device
    bundle = find_bundle_dir(bundle_dir)
    require_complete(Path(bundle_dir), "train")
    require_complete(Path(metrics_path).parent, "evaluate")
    payload = read_json(Path(metrics_path))
    if not isinstance(payload, dict) or not isinstance(payload.get("metrics"), dict):
        raise UserError(f"{metrics_path}: not a metrics.json (run the evaluate step first)")
    metrics = payload["metrics"]
    fingerprint = str(payload.get("dataset_fingerprint") or "")
    pid = pipeline_run_id or os.environ.get(ENV_PIPELINE_RUN_ID) or bundle_run_id(bundle)
    rows = load_manifest(manifest) if manifest is not None else None

    with step_tracking("register", pid, tracking, params={"registry": cfg},
                       dataset_fingerprint=fingerprint or None) as run_id:
        client = mlflow_tracking.get_client(tracking.tracking_uri or None)
        existing = registry.find_version_for_pipeline_run(client, name, pid)
        model_uri = existing.source if existing is not None else None
        if existing is None:
            from ..mlops.serving.pyfunc_model import log_pyfunc

            model_uri = log_pyfunc(bundle, name="model", run_id=run_id, device=device).model_uri
        kind = str((read_json(bundle / "bundle.json") or {}).get("model_kind", "recontrast"))
        version = registry.register_candidate(run_id, name, pid, metrics, fingerprint, model_uri=model_uri,
                                              client=client, tags={"model_kind": kind})
        mv = client.get_model_version(name, version)
        recorded = (mv.tags or {}).get(registry.TAG_DECISION)
        if recorded is not None:  # a retry after the gate already ran: report, don't redo
            decision = Decision(recorded in ("promoted", "forced"), (mv.tags or {}).get(registry.TAG_REASON, ""))
            decision_label = recorded
        else:
            evaluator = champion_reevaluator(client, name, rows, device) if rows is not None else None
            decision = registry.promote_if_better(client, name, version, cfg.policy(), evaluator)
            decision_label = "promoted" if decision.promote else "rejected"
        aliases = registry.status(name, client=client)["aliases"]
        result = {
            "model_name": name,
            "version": str(version),
            "promoted": bool(decision.promote),
            "decision": decision_label,
            "reason": decision.reason,
            "champion": aliases.get(registry.CHAMPION),
            "challenger": aliases.get(registry.CHALLENGER),
            "previous_champion": aliases.get(registry.PREVIOUS_CHAMPION),
            "pipeline_run_id": pid,
            "run_id": run_id,
            "model_uri": model_uri,
            # written to register.json and printed: a password in the URI is redacted
            "tracking_uri": redact_uri(mlflow_tracking.resolve_tracking_uri(tracking.tracking_uri or None)),
        }
        mlflow_tracking.set_tags({"registered_version": version, "promotion_decision": decision_label}, run_id)
        mlflow_tracking.log_metrics({"register/promoted": float(decision.promote)}, run_id)
    if end_pipeline:
        mlflow_tracking.end_pipeline_run(pid, "FINISHED", experiment=tracking.experiment,
                                         tracking_uri=tracking.tracking_uri or None)
    if out_path is not None:
        atomic_write_json(Path(out_path), result)
    return result


# ----------------------------------------------------------------------------- its record
def metrics_file(report: PathLike) -> Path:
    """``metrics.json`` of an evaluate output folder (or the file itself)."""
    p = Path(report)
    return p / METRICS_FILE if p.is_dir() else p


def _cli(args, settings: PipelineConfig, progress: bool, pipeline_run_id: Optional[str]) -> dict:
    return register(args.bundle, metrics_file(args.report), settings, manifest=args.manifest,
                    out_path=args.out, pipeline_run_id=pipeline_run_id)


def _component(v: dict) -> tuple:
    import json

    from .settings import with_run_values

    result = register(v["bundle"].path, metrics_file(v["report"].path),
                      with_run_values(v["settings"], model_name=v["model_name"]),
                      manifest=v["dataset"].path, pipeline_run_id=component_run_id(v))
    return (bool(result["promoted"]), str(result["version"]), str(result["decision"]),
            str(result["champion"] or ""), json.dumps(result, default=str))


RECORD = register_step(StepRecord(
    name="register",
    summary="The promotion decision as outputs; ``result`` is the full decision JSON. The rule is "
            "settings.registry (model_name overrides its model name).",
    run=register, sections=("registry", "train.device", "tracking"),
    cli=_cli, component=_component,
    inputs=(Port("bundle", "Model", flag="bundle", dvc_path="artifacts/train"),
            Port("report", "Artifact", flag="report", dvc_path="artifacts/evaluate"),
            Port("dataset", "Dataset", flag="manifest", dvc_path="artifacts/ingest")),
    run_values=(("model_name", str),),
    returns=(("promoted", bool), ("version", str), ("decision", str), ("champion", str), ("result", str)),
    dvc=DvcStage(out="artifacts/register.json", cached=False),
))
