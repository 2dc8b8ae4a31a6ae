"""The pipeline steps: ingest -> adapt -> train -> evaluate -> register.

One plain function per step. The CLI (``recontrast pipeline ...``), the KFP components
(``components/``) and the DVC stages (``dvc.yaml``, through ``python -m
recontrast_core.steps``) all call these same functions. Steps talk only through files
(see ``docs/contracts.md``):

==========  =====================================================  =====================
step        reads                                                  writes (in out_dir)
==========  =====================================================  =====================
ingest      a folder, ``s3://bucket/prefix`` or a DVC repo path    ``manifest.json``,
                                                                   ``ingest.json``,
                                                                   ``data/`` (remote
                                                                   sources, copy_local)
adapt       manifest                                               ``encoder.safetensors``
                                                                   + ``encoder.json``
train       manifest (+ adapted encoder)                           the model bundle
evaluate    bundle + manifest (test split)                         ``metrics.json``,
                                                                   ``scores.csv``,
                                                                   ``plots/``
register    bundle + metrics.json (+ manifest, to re-evaluate      MLflow registry;
            the champion on the same data)                         returns the decision
==========  =====================================================  =====================

A manifest whose dataset was materialised under the ingest output (``data/``) stays
usable when the folder moves (KFP passes artifacts between pods, DVC caches them):
:func:`load_manifest` re-anchors its root on ``<manifest dir>/data`` when the recorded
absolute root is gone.

MLflow: with ``pipeline_run_id`` set, each step logs into its own child run under the
pipeline's parent run (``recontrast_core.tracking``: found-or-created by tag, so steps in
separate processes or retried steps land in the same place). Without it, nothing is
logged, except by ``register``, which always needs the registry. Credentials only come
from the environment (``AWS_*``, ``MLFLOW_TRACKING_*``); they are never parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar, Union
from urllib.parse import urlparse

from pydantic import BaseModel

from .config import (
    AdaptConfig,
    CalibrationConfig,
    InferenceConfig,
    PipelineConfig,
    RegistryConfig,
    TrainConfig,
)
from .data.manifest import Manifest
from .errors import UserError

PathLike = Union[str, os.PathLike]
M = TypeVar("M", bound=BaseModel)

STEPS = ("ingest", "adapt", "train", "evaluate", "register")
DEFAULT_EXPERIMENT = "recontrast"
MANIFEST_FILE = "manifest.json"
INGEST_FILE = "ingest.json"
DATA_DIR = "data"
METRICS_FILE = "metrics.json"
METRICS_SUMMARY_FILE = "metrics_summary.json"  # scalar metrics only (DVC `metrics show`)
ENCODER_FILE = "encoder.safetensors"
ADAPT_SKIPPED_FILE = "adapt_skipped.json"
REGISTER_FILE = "register.json"
S3_INDEX_FILE = ".s3-index.json"
SHOTS_SEED = 0  # the few-shot selection is the same in adapt and train

# Environment variables naming an S3-compatible endpoint (MinIO, moto), first match wins.
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
ENV_PIPELINE_RUN_ID = "RECONTRAST_PIPELINE_RUN_ID"


# ---------------------------------------------------------------------------------------
# settings: pydantic configs + flat overrides (KFP parameters and CLI flags are flat)
# ---------------------------------------------------------------------------------------
# Flat aliases for nested fields, shared by TrainConfig and AdaptConfig.
_FLAT_ALIASES = {
    "backbone_name": "backbone.name",
    "backbone_weights": "backbone.weights",
    "feature_location": "backbone.feature_location",
    "out_indices": "backbone.out_indices",
}


def build_config(model: type[M], base: Union[M, Mapping[str, Any], None] = None, **overrides: Any) -> M:
    """``model`` from ``base`` (an instance, a nested dict or None = defaults) plus flat
    ``overrides``. ``None`` values are ignored (= keep the default); ``backbone`` may be a
    model name string; ``backbone_weights`` / ``feature_location`` / dotted keys
    (``backbone.weights``) address nested fields. Unknown keys are a :class:`UserError`.
    """
    if base is None:
        data: dict[str, Any] = {}
    elif isinstance(base, BaseModel):
        data = base.model_dump()
    else:
        data = json.loads(json.dumps(dict(base), default=str)) if base else {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "backbone" and isinstance(value, str):
            key = "backbone.name"
        key = _FLAT_ALIASES.get(key, key)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"setting {key!r}: {part!r} is not a section")
        node[parts[-1]] = value
    try:
        return model.model_validate(data)
    except Exception as exc:  # pydantic ValidationError: one readable line per field
        raise UserError(f"invalid {model.__name__} settings: {exc}") from exc


def adapt_config_for(p: PipelineConfig) -> AdaptConfig:
    """The adapt settings of a pipeline: method and shots from the pipeline, and the
    encoder the trainer will use (backbone, image size, device) so the adapted weights fit."""
    return p.adapt.model_copy(update={
        "method": p.adapt_method if p.adapt_method != "none" else p.adapt.method,
        "shots": p.shots,
        "backbone": p.train.backbone,
        "image_size": p.train.image_size,
        "device": p.train.device,
    })


def load_params(path: Optional[PathLike] = None) -> PipelineConfig:
    """``params.yaml`` (the DVC params file) as a :class:`PipelineConfig`; defaults if None."""
    if path is None:
        return PipelineConfig()
    from .config import load_yaml_config

    return load_yaml_config(Path(path), PipelineConfig)


# ---------------------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------------------
def manifest_file(path: PathLike) -> Path:
    """The manifest file of ``path`` (a manifest.json or an ingest output folder)."""
    p = Path(path)
    return p / MANIFEST_FILE if p.is_dir() else p


def load_manifest(path: PathLike) -> Manifest:
    """Load an ingest output's manifest; re-anchor its root on the materialised ``data/``
    folder beside it when the recorded root no longer exists (moved artifact)."""
    mpath = manifest_file(path)
    if not mpath.is_file():
        raise UserError(f"{mpath}: manifest not found (run the ingest step first)")
    manifest = Manifest.load(mpath)
    if Path(manifest.root).is_dir():
        return manifest
    info = _read_json(mpath.parent / INGEST_FILE) or {}
    data_dir = info.get("data_dir")
    if data_dir and (mpath.parent / data_dir).is_dir():
        return replace(manifest, root=str((mpath.parent / data_dir).resolve()))
    raise UserError(f"{mpath}: dataset root {manifest.root} not found")


@contextlib.contextmanager
def anchored_manifest_file(path: PathLike) -> Iterator[Path]:
    """A manifest file whose root exists here (for code that calls ``Manifest.load``)."""
    mpath = manifest_file(path)
    manifest = load_manifest(mpath)
    if Path(Manifest.load(mpath).root) == Path(manifest.root):
        yield mpath
        return
    with tempfile.TemporaryDirectory(prefix="recontrast-manifest-") as tmp:
        yield manifest.save(Path(tmp) / MANIFEST_FILE)


def find_bundle_dir(path: PathLike) -> Path:
    """The model bundle folder in ``path`` (itself, or the one folder below it holding
    ``bundle.json``: KFP Model artifacts and train outputs may nest it)."""
    p = Path(path)
    if (p / "bundle.json").is_file():
        return p
    hits = sorted(p.rglob("bundle.json")) if p.is_dir() else []
    if len(hits) == 1:
        return hits[0].parent
    if not hits:
        raise UserError(f"{p}: no model bundle (bundle.json) found")
    raise UserError(f"{p}: several model bundles found: {[str(h.parent) for h in hits]}")


def find_encoder(path: Optional[PathLike]) -> Optional[Path]:
    """The adapted encoder weights in ``path`` (file or adapt output folder); None when
    ``path`` is None or the adapt step was skipped."""
    if path is None or str(path) == "":
        return None
    p = Path(path)
    if p.is_file():
        return p
    if (p / ADAPT_SKIPPED_FILE).is_file():
        return None
    if (p / ENCODER_FILE).is_file():
        return p / ENCODER_FILE
    hits = sorted(p.rglob("*.safetensors")) if p.is_dir() else []
    if len(hits) == 1:
        return hits[0]
    raise UserError(f"{p}: no adapted encoder ({ENCODER_FILE}) found")


def select_shots(manifest: Manifest, shots: Optional[int], seed: int = SHOTS_SEED) -> Manifest:
    """Few-shot view: keep ``shots`` normal training images (the adapt step's sampler, so
    adapt and train see the same shots) and every test row. ``None``/0 = all."""
    if not shots:
        return manifest
    from .adapt.shots import sample_shots

    keep = {e.path for e in sample_shots(manifest, shots, seed).entries}
    return manifest.subset(e for e in manifest.entries if e.split != "train" or e.path in keep)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------
# MLflow: one child run per step, only when a pipeline run id is given
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _step_tracking(
    step: str,
    pipeline_run_id: Optional[str],
    tracking_uri: Optional[str],
    experiment: str,
    params: Any = None,
    **parent_kw: Any,
) -> Iterator[Optional[str]]:
    if not pipeline_run_id:
        yield None
        return
    from . import tracking

    with tracking.step_run(
        pipeline_run_id,
        step,
        experiment=experiment,
        tracking_uri=tracking_uri or None,
        params=params,
        **parent_kw,
    ) as run_id:
        yield run_id


def _log_artifacts(run_id: Optional[str], local: Path, artifact_path: str, tracking_uri: Optional[str]) -> None:
    if run_id is None or not Path(local).exists():
        return
    from . import tracking

    client = tracking.get_client(tracking_uri or None)
    if Path(local).is_dir():
        client.log_artifacts(run_id, str(local), artifact_path)
    else:
        client.log_artifact(run_id, str(local), artifact_path)


# ---------------------------------------------------------------------------------------
# ingest: local folder, s3:// prefix, DVC repository path
# ---------------------------------------------------------------------------------------
def s3_endpoint(endpoint_url: Optional[str] = None) -> Optional[str]:
    """The S3 endpoint: the argument, else the first of :data:`S3_ENDPOINT_ENV` set."""
    if endpoint_url:
        return endpoint_url
    for name in S3_ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _retry(fn: Callable[[], Any], what: str, attempts: int = 4, base_delay: float = 0.5) -> Any:
    """Call ``fn`` with exponential backoff on transient errors (botocore already retries
    each request; this covers a connection dropped mid-download)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    transient: tuple = (ConnectionClosedError, EndpointConnectionError, ReadTimeoutError,
                        ResponseStreamingError, ConnectionError, TimeoutError)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status < 500 or attempt == attempts:
                raise
        except transient:
            if attempt == attempts:
                raise
        time.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{uri}: not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.lstrip("/")


def download_s3_prefix(
    uri: str,
    dest: PathLike,
    *,
    endpoint_url: Optional[str] = None,
    max_attempts: int = 8,
) -> dict:
    """Download every object under ``s3://bucket/prefix`` to ``dest`` (keys relative to the
    prefix). Unchanged objects (same ETag as recorded in ``dest/.s3-index.json``) are not
    downloaded again. Credentials come from the environment / AWS config only.
    Returns ``{"objects": n, "downloaded": n, "bytes": n}``."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint(endpoint_url),
        config=Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        ),
    )
    index_path = dest / S3_INDEX_FILE
    index: dict[str, str] = _read_json(index_path) or {}
    stats = {"objects": 0, "downloaded": 0, "bytes": 0}
    try:
        paginator = client.get_paginator("list_objects_v2")
        pages = _retry(lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)), f"list {uri}")
        for page in pages:
            for obj in page.get("Contents", []) or []:
                key = obj["Key"]
                rel = key[len(prefix):]
                if not rel or rel.endswith("/"):
                    continue  # folder marker
                parts = Path(rel).parts
                if any(p in ("..", "") for p in parts) or Path(rel).is_absolute():
                    raise UserError(f"s3://{bucket}/{key}: unsafe object key")
                target = dest.joinpath(*parts)
                stats["objects"] += 1
                etag = str(obj.get("ETag", ""))
                if target.is_file() and index.get(rel) == etag and target.stat().st_size == obj["Size"]:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".part")

                def _get(key=key, tmp=tmp):
                    client.download_file(bucket, key, str(tmp))

                _retry(_get, f"download s3://{bucket}/{key}")
                os.replace(tmp, target)
                index[rel] = etag
                stats["downloaded"] += 1
                stats["bytes"] += int(obj["Size"])
    except NoCredentialsError as exc:
        raise UserError(
            f"{uri}: no S3 credentials (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "or an AWS profile)"
        ) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise UserError(f"{uri}: S3 error {code or ''}: {exc}") from exc
    except BotoCoreError as exc:
        raise UserError(f"{uri}: cannot reach S3 ({exc})") from exc
    finally:
        if stats["downloaded"]:
            _write_json(index_path, index)
    if stats["objects"] == 0:
        raise UserError(f"{uri}: no objects under this prefix")
    return stats


def fetch_dvc_path(
    repo: str,
    path: str,
    dest: PathLike,
    *,
    rev: Optional[str] = None,
    remote: Optional[str] = None,
    s3_endpoint_url: Optional[str] = None,
) -> Optional[str]:
    """Copy ``path`` (a DVC-tracked folder or file) of the git+DVC repository ``repo`` (a
    local path or a git URL) at revision ``rev`` to ``dest``, pulling from the DVC remote
    (``remote``: a remote name, default the repo's default remote). ``s3_endpoint_url``
    overrides that remote's ``endpointurl`` (MinIO). Returns the resolved git commit."""
    from dvc.api import DVCFileSystem

    kw: dict[str, Any] = {}
    if remote:
        kw["remote"] = remote
    if s3_endpoint_url:
        kw["remote_config"] = {"endpointurl": s3_endpoint_url}
    dest = Path(dest)
    where = f"{_redacted_uri(str(repo))}@{rev or 'HEAD'}"
    try:
        fs = DVCFileSystem(repo, rev=rev or None, **kw)
    except Exception as exc:  # scmrepo/dvc errors: bad repo, unknown revision
        raise UserError(f"{where}: cannot open the DVC repository: {exc}") from exc
    commit = _dvc_commit(fs, repo, rev)
    src = path.strip("/") or "/"
    try:
        if not fs.exists(src):
            raise UserError(f"{where}: {path} not found in the repository")
        if dest.exists():
            shutil.rmtree(dest)
        if fs.isdir(src):
            dest.mkdir(parents=True)
            fs.get(src.rstrip("/") + "/", str(dest) + os.sep, recursive=True)
        else:
            dest.mkdir(parents=True)
            fs.get_file(src, str(dest / Path(src).name))
    except UserError:
        raise
    except Exception as exc:  # dvc: missing cache/remote data, auth, network
        raise UserError(f"{where}: cannot fetch {path}: {exc}") from exc
    return commit


def _dvc_commit(fs, repo: str, rev: Optional[str]) -> Optional[str]:
    """The git commit a DVCFileSystem reads from (best effort)."""
    inner = getattr(fs, "fs", fs)  # dvc.api.DVCFileSystem may be the wrapper or the inner fs
    try:
        return inner.repo.get_rev()
    except Exception:
        return rev


def _resolve_layout_options(options: Optional[Mapping[str, Any]], root: Path) -> dict:
    """Folder-layout options (normal_dir, abnormal_dir, mask_dir) relative to the dataset."""
    out = dict(options or {})
    for key in ("normal_dir", "abnormal_dir", "mask_dir"):
        if out.get(key) and not Path(out[key]).is_absolute():
            out[key] = str(root / out[key])
    return out


def _redacted_uri(uri: str) -> str:
    """Drop a user:password@ part of a URL (git over https with a token)."""
    parsed = urlparse(uri)
    if parsed.password or parsed.username:
        netloc = parsed.hostname or ""
        if parsed.port:
            netloc += f":{parsed.port}"
        return parsed._replace(netloc=netloc).geturl()
    return uri


def ingest(
    source: PathLike,
    out_dir: PathLike,
    *,
    layout: str = "auto",
    dvc_repo: Optional[str] = None,
    dvc_rev: Optional[str] = None,
    dvc_remote: Optional[str] = None,
    s3_endpoint_url: Optional[str] = None,
    copy_local: bool = False,
    check_decode: bool = True,
    layout_options: Optional[Mapping[str, Any]] = None,
    pipeline_run_id: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    progress: bool = False,
) -> Path:
    """Fetch, validate and hash a dataset; write ``manifest.json`` + ``ingest.json``.

    ``source``: a local folder (or manifest.json); an ``s3://bucket/prefix`` (downloaded
    to ``out_dir/data`` with boto3, endpoint from ``s3_endpoint_url`` or
    ``AWS_ENDPOINT_URL`` / ``S3_ENDPOINT_URL``); or, with ``dvc_repo``, a path inside that
    DVC-tracked git repository at ``dvc_rev`` (fetched to ``out_dir/data`` through
    ``DVCFileSystem``). A dataset that fails validation raises
    :class:`~recontrast_core.errors.DataValidationError` naming the file, and no manifest
    is written. Returns the manifest path.
    """
    from .data.layouts import read_dataset
    from .data.validate import validate_manifest

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / DATA_DIR
    source = str(source)
    commit: Optional[str] = None
    fetch: dict[str, Any] = {}
    if dvc_repo:
        kind = "dvc"
        commit = fetch_dvc_path(
            dvc_repo, source, data_dir, rev=dvc_rev, remote=dvc_remote, s3_endpoint_url=s3_endpoint_url
        )
        local = data_dir
        dataset_uri = f"dvc+{_redacted_uri(str(dvc_repo))}#{source.strip('/')}@{commit or dvc_rev or 'HEAD'}"
    elif source.startswith("s3://"):
        kind = "s3"
        fetch = download_s3_prefix(source, data_dir, endpoint_url=s3_endpoint_url)
        local = data_dir
        dataset_uri = source
    else:
        kind = "local"
        src = Path(source).expanduser().resolve()
        dataset_uri = str(src)
        if copy_local and src.is_dir():
            if data_dir.exists():
                shutil.rmtree(data_dir)
            shutil.copytree(src, data_dir)
            local = data_dir
        else:
            local = src
    materialised = local == data_dir

    params = {
        "source": dataset_uri,
        "source_kind": kind,
        "layout": layout,
        "dvc_rev": dvc_rev,
        "check_decode": check_decode,
        **({"layout_options": dict(layout_options)} if layout_options else {}),
    }
    with _step_tracking("ingest", pipeline_run_id, tracking_uri, experiment, params=params,
                        dvc_rev=commit or dvc_rev) as run_id:
        manifest = read_dataset(local, layout=layout, **_resolve_layout_options(layout_options, local))
        report = validate_manifest(manifest, check_decode=check_decode, progress=progress)
        manifest = manifest.with_hashes()
        mpath = manifest.save(out / MANIFEST_FILE)
        counts = {
            "n_images": len(manifest),
            "train_normal": int(report.counts["train"]["0"]),
            "train_anomalous": int(report.counts["train"]["1"]),
            "test_normal": int(report.counts["test"]["0"]),
            "test_anomalous": int(report.counts["test"]["1"]),
            "masks": int(report.n_masks),
        }
        info = {
            "source": dataset_uri,
            "source_kind": kind,
            "dvc_repo": _redacted_uri(str(dvc_repo)) if dvc_repo else None,
            "dvc_rev": dvc_rev,
            "dvc_commit": commit,
            "fingerprint": manifest.fingerprint,
            "counts": counts,
            "defect_counts": dict(report.defect_counts),
            "warnings": list(report.warnings),
            "data_dir": DATA_DIR if materialised else None,
            "fetch": fetch,
        }
        _write_json(out / INGEST_FILE, info)
        if run_id is not None:
            from . import tracking

            tracking.start_pipeline_run(
                pipeline_run_id, experiment=experiment, tracking_uri=tracking_uri or None,
                dataset_fingerprint=manifest.fingerprint, dvc_rev=commit or dvc_rev,
            )
            tracking.log_dataset_input(
                dataset_uri, manifest.fingerprint, run_id,
                dvc_rev=commit or dvc_rev, n_images=len(manifest),
            )
            tracking.log_metrics({f"data/{k}": v for k, v in counts.items()}, run_id)
            _log_artifacts(run_id, out / INGEST_FILE, "ingest", tracking_uri)
    return mpath


# ---------------------------------------------------------------------------------------
# adapt, train, evaluate
# ---------------------------------------------------------------------------------------
def adapt(
    manifest_path: PathLike,
    out_dir: PathLike,
    config: Union[AdaptConfig, Mapping[str, Any], None] = None,
    *,
    shots: Optional[int] = None,
    pipeline_run_id: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Adapt the encoder (MSC or COFT) on the normal training images; returns the
    ``encoder.safetensors`` path (``encoder.json`` beside it). ``overrides`` are flat
    :class:`AdaptConfig` settings (``method="coft"``, ``epochs=5``, ``backbone="..."``)."""
    cfg = build_config(AdaptConfig, config, shots=shots, **overrides)
    manifest = select_shots(load_manifest(manifest_path), cfg.shots)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _step_tracking("adapt", pipeline_run_id, tracking_uri, experiment,
                        params={"adapt": cfg}) as run_id:
        from .adapt import run_adapt

        t0 = time.perf_counter()
        encoder = Path(run_adapt(manifest, cfg, out, progress=progress))
        if run_id is not None:
            from . import tracking

            tracking.log_metrics({"adapt/wall_time_s": time.perf_counter() - t0}, run_id)
            _log_artifacts(run_id, encoder.with_suffix(".json"), "adapt", tracking_uri)
    return encoder


def skip_adapt(out_dir: PathLike, reason: str = "adapt_method=none") -> Path:
    """Mark an adapt output as skipped (DVC stages are static; train then starts from
    the backbone's own weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / ENCODER_FILE, out / "encoder.json"):
        stale.unlink(missing_ok=True)
    return _write_json(out / ADAPT_SKIPPED_FILE, {"skipped": True, "reason": reason})


def train(
    manifest_path: PathLike,
    out_dir: PathLike,
    config: Union[TrainConfig, Mapping[str, Any], None] = None,
    *,
    init_encoder: Optional[PathLike] = None,
    shots: Optional[int] = None,
    inference: Union[InferenceConfig, Mapping[str, Any], None] = None,
    calibration: Union[CalibrationConfig, Mapping[str, Any], None] = None,
    resume: bool = False,
    pipeline_run_id: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train ReContrast on the normal training images; returns the model bundle folder.

    ``init_encoder``: an adapted encoder (file or adapt output folder; a skipped adapt
    output counts as none). ``overrides`` are flat :class:`TrainConfig` settings
    (``iterations=200``, ``image_size=128``, ``backbone="wide_resnet50_2"``).
    """
    cfg = build_config(TrainConfig, config, **overrides)
    inf = build_config(InferenceConfig, inference)
    cal = build_config(CalibrationConfig, calibration)
    encoder = find_encoder(init_encoder)
    manifest = select_shots(load_manifest(manifest_path), shots).select(split="train")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {"train": cfg, "inference": inf, "calibration": cal, "shots": shots or 0,
              "init_encoder": "adapted" if encoder else "backbone weights",
              "n_train_images": len(manifest)}
    with _step_tracking("train", pipeline_run_id, tracking_uri, experiment, params=params,
                        dataset_fingerprint=manifest.fingerprint) as run_id:
        from .train import train_model

        result = train_model(
            manifest, cfg, out, init_encoder=str(encoder) if encoder else None, resume=resume,
            progress=progress,
            calibration=cal, inference=inf,
        )
        if run_id is not None:
            from . import tracking

            tracking.log_loss_curve(result.history, run_id)
            tracking.log_metrics(
                {
                    "train/iterations": getattr(result, "iterations", None),
                    "train/wall_time_s": getattr(result, "wall_time_s", None),
                    "train/images_per_s": getattr(result, "images_per_s", None),
                },
                run_id,
            )
            _log_artifacts(run_id, Path(result.bundle_dir) / "bundle.json", "train", tracking_uri)
    return Path(result.bundle_dir)


def evaluate(
    bundle_dir: PathLike,
    manifest_path: PathLike,
    out_dir: PathLike,
    *,
    device: str = "auto",
    overlay_images: int = 8,
    pipeline_run_id: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    progress: bool = True,
) -> Path:
    """Evaluate the bundle on the manifest's test split; returns ``metrics.json``.

    Also writes ``metrics_summary.json`` (scalars only), ``plots/roc.png``, ``plots/pr.png``
    and ``plots/overlay_grid.png`` (the ``overlay_images`` highest-scoring anomalous and
    normal test images with their calibrated anomaly maps; 0 = none).
    """
    bundle = find_bundle_dir(bundle_dir)
    manifest = load_manifest(manifest_path)
    test = manifest.select(split="test")
    if len(test) == 0:
        raise UserError(f"{manifest_file(manifest_path)}: no test images to evaluate on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _step_tracking("evaluate", pipeline_run_id, tracking_uri, experiment,
                        params={"device": device, "n_test_images": len(test)}) as run_id:
        from .bundle import load_detector
        from .evaluate import evaluate_bundle

        detector = load_detector(bundle, device)
        payload = evaluate_bundle(detector, test, out_dir=out, progress=progress, device=device,
                                  keep_maps=overlay_images > 0)
        maps, images = payload.pop("_maps", None), payload.pop("_images", None)
        mpath = out / METRICS_FILE
        if not mpath.is_file():
            _write_json(mpath, payload)
        _write_json(out / METRICS_SUMMARY_FILE, {
            k: v for k, v in payload.get("metrics", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        })
        rows = payload.get("per_image") or []
        from .tracking import plot_roc_pr  # matplotlib + sklearn only; no MLflow import

        plot_roc_pr([r["label"] for r in rows], [r["score"] for r in rows], out / "plots")
        if maps is not None and images is not None:
            overlay_grid(rows, images, maps, detector.calibration, out / "plots" / "overlay_grid.png",
                         n=overlay_images)
        if run_id is not None:
            from . import tracking

            tracking.log_evaluation(payload, run_id, overlay_png=None)
            _log_artifacts(run_id, out / "plots", "evaluation/plots", tracking_uri)
            _log_artifacts(run_id, out / "scores.csv", "evaluation", tracking_uri)
    return mpath


def overlay_grid(rows: list[dict], images, maps, calibration, path: Path, n: int = 8) -> Optional[Path]:
    """A PNG grid: up to ``n`` anomalous then ``n`` normal test images (highest scores
    first), each as [image | calibrated anomaly-map overlay] with its score in the title."""
    import numpy as np

    from .calibration import normalise
    from .predict import overlay

    order = sorted(range(len(rows)), key=lambda i: -rows[i]["score"])
    picks = [i for i in order if rows[i]["label"] == 1][:n] + [i for i in order if rows[i]["label"] == 0][:n]
    if not picks:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = 4
    nrows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 3.2, nrows * 1.9), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), picks):
        tile = overlay(np.asarray(images[i]), normalise(np.asarray(maps[i]), calibration))
        ax.imshow(tile)
        r = rows[i]
        ax.set_title(f"{r['defect_type']} s={r['normalized_score']:.2f}" + (" *" if r["decision"] else ""),
                     fontsize=8, color="red" if r["label"] else "black")
    fig.suptitle("anomaly maps (red = above threshold; * = flagged)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# register
# ---------------------------------------------------------------------------------------
def bundle_run_id(bundle_dir: PathLike) -> str:
    """A stable pipeline run id from the bundle's content (``bundle-<sha256[:16]>``), for
    callers without one (DVC stages): registering the same bundle twice is a no-op."""
    bundle = find_bundle_dir(bundle_dir)
    h = hashlib.sha256()
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(bundle)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "bundle-" + h.hexdigest()[:16]


def register(
    bundle_dir: PathLike,
    metrics_path: PathLike,
    *,
    model_name: Optional[str] = None,
    pipeline_run_id: Optional[str] = None,
    manifest_path: Optional[PathLike] = None,
    policy: Union[RegistryConfig, Mapping[str, Any], None] = None,
    tracking_uri: Optional[str] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    device: str = "auto",
    out_path: Optional[PathLike] = None,
    end_pipeline: bool = True,
) -> dict:
    """Log the bundle as a pyfunc model, register it (alias ``challenger``) and run the
    promotion gate (``champion`` only if it passes the floors and beats the champion on
    the same evaluation data by the margin).

    ``policy``: :class:`RegistryConfig` (or a dict of its fields; ``model_name`` overrides
    its model name). ``manifest_path`` lets the gate re-evaluate the champion when it was
    evaluated on other data. Idempotent per ``pipeline_run_id`` (a retried step returns
    the same version and decision). Returns ``{"model_name", "version", "promoted",
    "decision", "reason", "champion", "challenger", "pipeline_run_id", "run_id",
    "model_uri"}`` and writes it to ``out_path`` when given.
    """
    from . import registry, tracking

    cfg = build_config(RegistryConfig, policy, model_name=model_name)
    name = cfg.model_name
    bundle = find_bundle_dir(bundle_dir)
    payload = _read_json(Path(metrics_path))
    if payload is None or not isinstance(payload.get("metrics"), dict):
        raise UserError(f"{metrics_path}: not a metrics.json (run the evaluate step first)")
    metrics = payload["metrics"]
    fingerprint = str(payload.get("dataset_fingerprint") or "")
    pid = pipeline_run_id or os.environ.get(ENV_PIPELINE_RUN_ID) or bundle_run_id(bundle)

    with _step_tracking("register", pid, tracking_uri, experiment,
                        params={"registry": cfg},
                        dataset_fingerprint=fingerprint or None) as run_id:
        client = tracking.get_client(tracking_uri or None)
        existing = registry.find_version_for_pipeline_run(client, name, pid)
        model_uri = existing.source if existing is not None else None
        if existing is None:
            from .pyfunc_model import log_pyfunc

            info = log_pyfunc(bundle, name="model", run_id=run_id, device=device)
            model_uri = info.model_uri
        version = registry.register_candidate(
            run_id, name, pid, metrics, fingerprint, model_uri=model_uri, client=client
        )
        mv = client.get_model_version(name, version)
        recorded = (mv.tags or {}).get(registry.TAG_DECISION)
        if recorded is not None:  # a retry after the gate already ran: report, don't redo
            decision = registry.Decision(recorded in ("promoted", "forced"),
                                         (mv.tags or {}).get(registry.TAG_REASON, ""))
            decision_label = recorded
        else:
            ctx = anchored_manifest_file(manifest_path) if manifest_path else contextlib.nullcontext(None)
            with ctx as anchored:
                evaluator = (
                    registry.make_champion_reevaluator(client, name, anchored, device)
                    if anchored is not None else None
                )
                decision = registry.promote_if_better(client, name, version, cfg.to_policy(), evaluator)
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
            "tracking_uri": tracking.resolve_tracking_uri(tracking_uri or None),
        }
        tracking.set_tags({"registered_version": version, "promotion_decision": decision_label}, run_id)
        tracking.log_metrics({"register/promoted": float(decision.promote)}, run_id)
    if end_pipeline:
        tracking.end_pipeline_run(pid, "FINISHED", experiment=experiment, tracking_uri=tracking_uri or None)
    if out_path is not None:
        _write_json(Path(out_path), result)
    return result


# ---------------------------------------------------------------------------------------
# `python -m recontrast_core.steps <step> ...`: the DVC stages' entry point
# ---------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    """Run one step with settings from ``params.yaml`` (a :class:`PipelineConfig`).

    MLflow logging per step happens when ``RECONTRAST_PIPELINE_RUN_ID`` is set (or
    ``--pipeline-run-id``); ``register`` always talks to the registry.
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m recontrast_core.steps", description=main.__doc__)
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("--params", default="params.yaml", help="params file (PipelineConfig)")
    ap.add_argument("--out", required=True, help="output folder (register: the result JSON)")
    ap.add_argument("--manifest", help="ingest output folder or manifest.json")
    ap.add_argument("--encoder", help="adapt output folder (train)")
    ap.add_argument("--bundle", help="model bundle folder (evaluate, register)")
    ap.add_argument("--metrics", help="metrics.json (register)")
    ap.add_argument("--summary", help="evaluate: also write the scalar metrics here (DVC metrics)")
    ap.add_argument("--pipeline-run-id", default=os.environ.get(ENV_PIPELINE_RUN_ID))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    def need(*names: str) -> None:
        missing = [n for n in names if not getattr(args, n)]
        if missing:
            ap.error(f"{args.step} needs " + ", ".join("--" + n for n in missing))

    try:
        p = load_params(args.params if Path(args.params).is_file() else None)
        track = dict(pipeline_run_id=args.pipeline_run_id, tracking_uri=p.tracking.tracking_uri,
                     experiment=p.tracking.experiment)
        progress = not args.no_progress
        if args.step == "ingest":
            d = p.data
            result: Any = ingest(
                d.source, args.out, layout=d.layout, dvc_repo=d.dvc_repo, dvc_rev=d.dvc_rev,
                s3_endpoint_url=d.s3_endpoint_url, copy_local=d.copy_local,
                check_decode=d.check_decode, progress=progress, **track,
            )
        elif args.step == "adapt":
            need("manifest")
            if p.adapt_method == "none":
                result = skip_adapt(args.out)
            else:
                result = adapt(args.manifest, args.out, adapt_config_for(p),
                               progress=progress, **track)
        elif args.step == "train":
            need("manifest")
            result = train(args.manifest, args.out, p.train, init_encoder=args.encoder,
                           shots=p.shots, inference=p.inference, calibration=p.calibration,
                           progress=progress, **track)
        elif args.step == "evaluate":
            need("bundle", "manifest")
            result = evaluate(args.bundle, args.manifest, args.out, device=p.train.device,
                              progress=progress, **track)
            if args.summary:
                Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(args.out) / METRICS_SUMMARY_FILE, args.summary)
        else:
            need("bundle", "metrics")
            result = register(args.bundle, args.metrics, manifest_path=args.manifest,
                              policy=p.registry, out_path=args.out, device=p.train.device, **track)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str) if isinstance(result, dict) else str(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
