"""Where a model comes from: a bundle folder, an ``s3://`` bundle prefix, a registered
version (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) or a run's artifact
(``runs:/RUN_ID/PATH``), resolved to a local bundle folder and a version string that names
exactly those weights (recorded with every score)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UserError, first_line
from ..filenames import BUNDLE_META_FILE, BUNDLE_WEIGHTS_FILE, CANDIDATES_DIR

_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9A-Za-z_-]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class ResolvedModel:
    uri: str          # as given
    version: str      # "NAME/VERSION", "run:RUN_ID/PATH" or "bundle:<sha256 prefix of its files>"
    bundle_dir: Path


def parse_model_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    m = _MODELS.match(uri.strip())
    if not m:
        raise UserError(f"--model takes models:/NAME@ALIAS or models:/NAME/VERSION, not {uri!r}")
    return m["name"], m["alias"], m["version"]


def bundle_digest(bundle_dir: Path) -> str:
    """``bundle:<12 hex>``: the SHA-256 of the bundle's metadata and weights."""
    h = hashlib.sha256()
    for name in (BUNDLE_META_FILE, BUNDLE_WEIGHTS_FILE):
        p = Path(bundle_dir) / name
        if p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return f"bundle:{h.hexdigest()[:12]}"


def _find_bundle(root: Path, uri: str) -> Path:
    if (root / BUNDLE_META_FILE).is_file():
        return root
    hits = sorted(h for h in root.rglob(BUNDLE_META_FILE) if CANDIDATES_DIR not in h.relative_to(root).parts)
    if not hits:
        raise UserError(f"{uri}: no {BUNDLE_META_FILE} in the model's files")
    return hits[0].parent


def _mlflow_errors(uri: str, exc: Exception) -> UserError:
    from .redaction import redact_uri

    return UserError(redact_uri(f"{uri}: cannot resolve the model ({first_line(exc)})"))


def _registered(uri: str, m: re.Match, dest: Path, tracking_uri: Optional[str]) -> ResolvedModel:
    from . import registry_lookup as lookup

    name = m["name"]
    try:
        client = lookup.get_client(tracking_uri, create=False)  # reading: no empty database made
        lookup.get_registered_model(client, name)
        if m["alias"]:
            mv = lookup.alias_version(client, name, m["alias"])
            if mv is None:
                raise UserError(f"{uri}: model {name!r} has no version with the alias {m['alias']!r}")
        else:
            mv = lookup.get_version(client, name, m["version"])
        root = lookup.download_bundle(client, name, mv, dest)
    except UserError as exc:
        msg = str(exc)
        raise UserError(msg if msg.startswith(uri) else f"{uri}: {msg}") from None
    except Exception as exc:  # MLflow/HTTP errors: an unreachable server, a missing artifact
        raise _mlflow_errors(uri, exc) from None
    return ResolvedModel(uri, f"{name}/{mv.version}", root)


def _run_artifact(uri: str, m: re.Match, dest: Path, tracking_uri: Optional[str]) -> ResolvedModel:
    import mlflow.artifacts

    from .tracking_store import resolve_tracking_uri

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                    tracking_uri=resolve_tracking_uri(tracking_uri))
    except Exception as exc:
        raise _mlflow_errors(uri, exc) from None
    return ResolvedModel(uri, f"run:{m['run']}/{m['path'].strip('/')}", _find_bundle(Path(local), uri))


def resolve_model(uri: str, dest: os.PathLike, tracking_uri: Optional[str] = None) -> ResolvedModel:
    """A local bundle folder for ``uri`` (remote files are downloaded into ``dest``).
    Every failure is one line naming ``uri`` (:class:`UserError`)."""
    text, dest = str(uri), Path(dest)
    if text.startswith("models:/"):
        m = _MODELS.match(text)
        if not m:
            raise UserError(f"{text}: not a model URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
        return _registered(text, m, dest, tracking_uri)
    if text.startswith("runs:/"):
        m = _RUNS.match(text)
        if not m:
            raise UserError(f"{text}: not a run URI (runs:/RUN_ID/PATH)")
        return _run_artifact(text, m, dest, tracking_uri)
    if text.startswith("s3://"):
        from .storage import download_s3_prefix

        download_s3_prefix(text, dest)
        root = _find_bundle(dest, text)
        return ResolvedModel(text, bundle_digest(root), root)
    if _SCHEME.match(text):
        raise UserError(f"{text}: unsupported model URI (a bundle folder, s3://, models:/ or runs:/)")
    return ResolvedModel(str(Path(text).resolve()), bundle_digest(Path(text)), Path(text))
