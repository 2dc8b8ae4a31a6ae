"""What a run records: tags, params, metrics, the loss curve, model selection, an
evaluation, the bundle and the dataset input, into a given run or MLflow's active one
(:func:`recontrast_core.mlops.tracking.step_run`). Everything passes through
:mod:`.redaction`: a credential never reaches MLflow."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .redaction import flatten_params, param_str, redact_params, redact_tags, redact_value, secret_env_values
from .tracking_store import get_client, mlflow_module

TAG_DVC_REV = "dvc_rev"
TAG_FINGERPRINT = "dataset_fingerprint"


def _run_id(run_id: Optional[str]) -> str:
    if run_id:
        return run_id
    active = mlflow_module().active_run()
    if active is None:
        raise RuntimeError("no MLflow run: pass run_id or call inside step_run()")
    return active.info.run_id


def set_tags(tags: Mapping[str, Any], run_id: Optional[str] = None, client=None) -> None:
    client = client or get_client()
    rid = _run_id(run_id)
    for key, value in redact_tags(tags).items():
        client.set_tag(rid, key, value)


def log_params(params: Any, run_id: Optional[str] = None, client=None) -> dict[str, str]:
    """Flatten (pydantic / dataclass / dict), redact and log; returns what was logged.

    A param already logged with the same value is skipped (MLflow refuses to change a
    param, and a retried step logs the same config again); a changed value is logged
    under ``<key>.retry`` rather than failing the step.
    """
    from mlflow.entities import Param

    client = client or get_client()
    rid = _run_id(run_id)
    flat = flatten_params(params)
    clean = {k: param_str(v) for k, v in redact_params(flat).items()}
    existing = client.get_run(rid).data.params
    todo = {}
    for key, value in clean.items():
        if key in existing:
            if existing[key] != value and f"{key}.retry" not in existing:
                todo[f"{key}.retry"] = value
            continue
        todo[key] = value
    items = [Param(k, v) for k, v in todo.items()]
    for i in range(0, len(items), 100):
        client.log_batch(rid, params=items[i : i + 100])
    return clean


def _finite_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        import numpy as np

        if isinstance(value, np.generic) and np.issubdtype(value.dtype, np.number):
            return float(value)
    except ImportError:  # pragma: no cover
        pass
    return None


def log_metrics(
    metrics: Mapping[str, Any],
    run_id: Optional[str] = None,
    *,
    step: int = 0,
    prefix: str = "",
    client=None,
) -> dict[str, float]:
    """Log the numeric entries of ``metrics`` (others are skipped); returns them."""
    import time

    from mlflow.entities import Metric

    client = client or get_client()
    rid = _run_id(run_id)
    now = int(time.time() * 1000)
    out = {}
    for key, value in metrics.items():
        num = _finite_number(value)
        if num is None or math.isnan(num):
            continue
        out[prefix + key] = num
    items = [Metric(k, v, now, step) for k, v in out.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(rid, metrics=items[i : i + 1000])
    return out


def log_loss_curve(
    history: Sequence[Mapping[str, Any]],
    run_id: Optional[str] = None,
    *,
    step_key: str = "iteration",
    keys: Sequence[str] = ("loss", "alpha"),
    prefix: str = "train/",
    client=None,
) -> int:
    """Log a training history (``[{iteration, loss, alpha}, ...]``) as stepped metrics.

    Metric names are ``train/loss`` and ``train/alpha``; returns the number of points.
    """
    import time

    from mlflow.entities import Metric

    client = client or get_client()
    rid = _run_id(run_id)
    now = int(time.time() * 1000)
    items = []
    for i, row in enumerate(history):
        step = int(row.get(step_key, i))
        for key in keys:
            num = _finite_number(row.get(key))
            if num is not None and not math.isnan(num):
                items.append(Metric(prefix + key, num, now, step))
    for i in range(0, len(items), 1000):
        client.log_batch(rid, metrics=items[i : i + 1000])
    return len(history)



def log_selection(kind: str, selection: Optional[Mapping[str, Any]], run_id: Optional[str] = None,
                  client=None) -> dict[str, float]:
    """The model kind a train step shipped (tag ``model_kind``) and, for ``model.kind: auto``,
    every candidate's and grid setting's validation metrics (``selection/<candidate>/<metric>``,
    ``selection/grid/<backbone>_<size>_<stats>/image_auroc``) and the fused candidate's
    image-score sources (tag ``fused_image_score``)."""
    fis = (selection or {}).get("fused_image_score") or {}
    set_tags({"model_kind": kind, **({"selection_rule": selection.get("rule", "")} if selection else {}),
              **({"fused_image_score": fis["chosen"]} if fis.get("chosen") else {})}, run_id, client)
    if not selection:
        return {}
    flat: dict[str, float] = {}
    for name, metrics in (selection.get("candidates") or {}).items():
        for key, value in metrics.items():
            flat[f"selection/{name}/{key}"] = value
    for rec in selection.get("grid") or []:
        tag = f"{rec['backbone']}_{rec['image_size']}_{rec['input_stats']}"
        flat[f"selection/grid/{tag}/image_auroc"] = rec["image_auroc"]
    for source, value in (fis.get("image_auroc") or {}).items():
        flat[f"selection/fused_image_score/{source}/image_auroc"] = value
    for key, value in (selection.get("wall_time_s") or {}).items():
        flat[f"selection/wall_time_s/{key}"] = value
    return log_metrics(flat, run_id, client=client)


def log_evaluation(
    metrics_payload: Any,
    run_id: Optional[str] = None,
    *,
    plots_dir: Optional[os.PathLike] = None,
    artifact_path: str = "evaluation",
    client=None,
) -> dict[str, float]:
    """Log an evaluation: its scalar metrics, ``metrics.json``, and the plots the evaluate
    step already drew (``plots_dir``: ROC, PR, overlay grid; they are not drawn again).

    ``metrics_payload`` is the metrics JSON payload (dict) or a path to ``metrics.json``
    (see docs/contracts.md). Returns the scalar metrics logged.
    """
    client = client or get_client()
    rid = _run_id(run_id)
    if isinstance(metrics_payload, (str, os.PathLike)):
        from ..runtime import load_json

        payload = load_json(Path(metrics_payload))
        if not isinstance(payload, dict):
            from ..errors import UserError

            raise UserError(f"{metrics_payload}: not a metrics.json (a JSON {type(payload).__name__})")
    else:
        payload = dict(metrics_payload)
    logged = log_metrics(payload.get("metrics", {}), rid, client=client)
    if payload.get("dataset_fingerprint"):
        client.set_tag(rid, "eval_dataset_fingerprint", str(payload["dataset_fingerprint"]))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.json").write_text(json.dumps(payload, indent=1, default=str))
        client.log_artifacts(rid, tmp, artifact_path)
    if plots_dir is not None and Path(plots_dir).is_dir():
        client.log_artifacts(rid, str(plots_dir), f"{artifact_path}/plots")
    return logged


def log_bundle(
    bundle_dir: os.PathLike, run_id: Optional[str] = None, artifact_path: str = "bundle", client=None
) -> str:
    """Upload the model bundle directory; returns its artifact URI."""
    client = client or get_client()
    rid = _run_id(run_id)
    client.log_artifacts(rid, str(bundle_dir), artifact_path)
    return f"runs:/{rid}/{artifact_path}"


def log_dataset_input(
    dataset_uri: str,
    fingerprint: str,
    run_id: Optional[str] = None,
    *,
    name: str = "dataset",
    dvc_rev: Optional[str] = None,
    context: str = "training",
    n_images: Optional[int] = None,
    client=None,
) -> None:
    """Record the dataset as an MLflow run input (``mlflow.data`` MetaDataset).

    Source = ``dataset_uri`` (a folder, an ``s3://`` prefix or a DVC path), digest =
    the manifest fingerprint; the DVC revision goes to the input tags and the run tags.
    """
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = client or get_client()
    rid = _run_id(run_id)
    dataset_uri = redact_value(str(dataset_uri), secret_env_values())
    source = _dataset_source(dataset_uri)
    ds = MetaDataset(source=source, name=name, digest=str(fingerprint)[:36])
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    if dvc_rev:
        tags.append(InputTag(TAG_DVC_REV, str(dvc_rev)))
    if n_images is not None:
        tags.append(InputTag("n_images", str(n_images)))
    client.log_inputs(rid, datasets=[DatasetInput(dataset=ds._to_mlflow_entity(), tags=tags)])
    run_tags: dict[str, Any] = {TAG_FINGERPRINT: fingerprint, "dataset_uri": dataset_uri}
    if dvc_rev:
        run_tags[TAG_DVC_REV] = dvc_rev
    set_tags(run_tags, rid, client=client)


def _dataset_source(uri: str):
    """A DatasetSource for ``uri``: MLflow's own for files/s3/http, else a plain URI one."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    import warnings

    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways"
            return resolve_dataset_source(uri)
    except Exception:
        pass
    # dvc://, git+..., or anything MLflow has no resolver for: keep the URI as-is.
    return HTTPDatasetSource(url=uri)
