"""Object storage: S3/MinIO downloads with retries, and DVC-tracked data at a revision.

One endpoint rule for everything S3 in the project (:func:`recontrast_core.runtime.s3_endpoint`:
the explicit URL, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / ``S3_ENDPOINT_URL`` /
``MLFLOW_S3_ENDPOINT_URL``). Credentials come only from the environment or AWS config.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union
from urllib.parse import urlparse

from ..errors import UserError, WeightsUnavailableError
from ..runtime import atomic_write_json, read_json, s3_endpoint

PathLike = Union[str, os.PathLike]
S3_INDEX_FILE = ".s3-index.json"


def s3_client(endpoint_url: Optional[str] = None, max_attempts: int = 8):
    """A boto3 S3 client on the project's endpoint rule, with standard retries and timeouts."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint(endpoint_url),
        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"}, connect_timeout=10, read_timeout=60),
    )


def with_retries(fn: Callable[[], Any], what: str, attempts: int = 4, base_delay: float = 0.5) -> Any:
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


@contextlib.contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """S3 failures as one-line :class:`UserError` naming ``uri`` (no credentials, an S3
    error code such as NoSuchBucket or AccessDenied, an unreachable endpoint)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
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


def iter_s3_pages(client, bucket: str, prefix: str) -> Iterator[list[dict]]:
    """The objects under ``prefix``, one listing page (up to 1000) at a time, each page
    fetched with retries; nothing is listed before it is asked for."""
    token: Optional[str] = None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = with_retries(lambda kw=kw: client.list_objects_v2(**kw), f"list s3://{bucket}/{prefix}")
        yield page.get("Contents", []) or []
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


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
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    client = s3_client(endpoint_url, max_attempts)
    index_path = dest / S3_INDEX_FILE
    index: dict[str, str] = read_json(index_path) or {}
    stats = {"objects": 0, "downloaded": 0, "bytes": 0}
    try:
        with s3_errors(uri):
            _download_objects(client, bucket, prefix, dest, index, stats)
    finally:
        if stats["downloaded"]:
            atomic_write_json(index_path, index)
    if stats["objects"] == 0:
        raise UserError(f"{uri}: no objects under this prefix")
    return stats


def _download_objects(client, bucket: str, prefix: str, dest: Path, index: dict, stats: dict) -> None:
    """The loop of :func:`download_s3_prefix` (page by page; unchanged objects skipped)."""
    for page in iter_s3_pages(client, bucket, prefix):
        for obj in page:
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

            with_retries(_get, f"download s3://{bucket}/{key}")
            os.replace(tmp, target)
            index[rel] = etag
            stats["downloaded"] += 1
            stats["bytes"] += int(obj["Size"])


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
    where = f"{redacted_uri(str(repo))}@{rev or 'HEAD'}"
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


def redacted_uri(uri: str) -> str:
    """Drop a user:password@ part of a URL (git over https with a token)."""
    parsed = urlparse(uri)
    if parsed.password or parsed.username:
        netloc = parsed.hostname or ""
        if parsed.port:
            netloc += f":{parsed.port}"
        return parsed._replace(netloc=netloc).geturl()
    return uri


def fetch_s3_file(uri: str, dest_dir: PathLike, endpoint_url: Optional[str] = None) -> Path:
    """Download one ``s3://bucket/key`` object into ``dest_dir`` (same file name)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise UserError(f"{uri}: not an s3:// object")
    target = Path(dest_dir) / Path(key).name
    target.parent.mkdir(parents=True, exist_ok=True)
    client = s3_client(endpoint_url)
    try:
        with_retries(lambda: client.download_file(bucket, key, str(target)), f"download {uri}")
    except (BotoCoreError, ClientError) as exc:
        raise WeightsUnavailableError(f"{uri}: cannot download: {exc}") from exc
    return target


def localize_weights(weights: str, dest_dir: Optional[PathLike] = None) -> str:
    """Backbone weights for the core: an ``s3://`` URI is downloaded (into ``dest_dir`` or
    a temporary folder) and its local path returned; anything else is returned as is."""
    if not str(weights).startswith("s3://"):
        return weights
    dest = Path(dest_dir) if dest_dir is not None else Path(tempfile.mkdtemp(prefix="recontrast-weights-"))
    return str(fetch_s3_file(weights, dest))
