"""Reading MLflow's model registry: a registered model, a version, the version behind an
alias, a version's files. Nothing here writes; the alias operations (register, promote,
roll back) are :mod:`recontrast_core.mlops.registry`, the model servers and
:mod:`recontrast_core.mlops.model_source` only read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import UserError


def get_client(tracking_uri: Optional[str] = None, *, create: bool = True):
    """A client of the registry; ``create=False`` where nothing will be written (a missing
    SQLite database is then an error, not a new empty file)."""
    from .tracking_store import get_client as _get

    return _get(tracking_uri, create=create)


def is_not_found(exc: Exception) -> bool:
    """MLflow's "no such model / version / alias" (not a server error)."""
    code = getattr(exc, "error_code", "") or ""
    return "RESOURCE_DOES_NOT_EXIST" in code or "NOT_FOUND" in code or "not found" in str(exc).lower()


def alias_version(client, model_name: str, alias: str):
    """The ModelVersion behind ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if is_not_found(exc) or "alias" in str(exc).lower():
            return None
        raise


def all_versions(client, model_name: str) -> list:
    """Every version of the model, oldest first."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(
            f"name = '{model_name}'", max_results=200, page_token=token
        )
        versions.extend(page)
        token = getattr(page, "token", None)
        if not token:
            break
    return sorted(versions, key=lambda v: int(v.version))


def get_registered_model(client, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(model_name)
    except MlflowException as exc:
        if is_not_found(exc):
            raise UserError(f"no registered model named {model_name!r}") from None
        raise


def get_version(client, model_name: str, version: str):
    from mlflow.exceptions import MlflowException

    if not str(version).strip().isdigit():
        raise UserError(f"{model_name}: version must be a number (as `registry status` lists them), not {version!r}")

    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if is_not_found(exc):
            raise UserError(f"{model_name}: no version {version}") from None
        raise


def download_bundle(client, model_name: str, mv, dst: os.PathLike) -> Path:
    """Download a version's files and return the directory holding ``bundle.json``."""
    import mlflow
    import mlflow.artifacts

    dst = Path(dst)
    uri = client.get_model_version_download_uri(model_name, str(mv.version))
    tracking_uri = getattr(getattr(client, "_tracking_client", None), "tracking_uri", None)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri or mlflow.get_tracking_uri()
    )
    root = Path(local)
    if (root / "bundle.json").is_file():
        return root
    hits = sorted(root.rglob("bundle.json"))
    if not hits:
        raise UserError(f"{model_name} v{mv.version}: no bundle.json in the registered model")
    return hits[0].parent
