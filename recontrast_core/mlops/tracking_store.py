"""Where MLflow runs go: the tracking store, the experiment, a client.

* ``MLFLOW_TRACKING_URI`` set (or ``tracking_uri=`` passed): that server / store.
* Otherwise the **embedded default**: ``sqlite:///<workdir>/mlflow.db`` for runs and the
  model registry, artifacts as files under ``<workdir>/mlartifacts``; ``workdir`` is the
  current directory unless passed. Browse it with
  ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` in that directory.
  The usual MLflow variables (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``) apply to S3
  artifact stores as always.

Every URI is checked before MLflow sees it (:func:`check_tracking_uri`), each problem one
line (a :class:`~recontrast_core.errors.UserError`) with any password in the URI redacted:

* its scheme must be one MLflow stores runs in (``http(s)``, ``sqlite``, ``file``,
  ``postgresql``, ``mysql``, ``mssql``, ``databricks``);
* ``sqlite``: the database's folder must exist (a mistyped path creates nothing), and a
  reading client (``create=False``: ``registry status``, ``--model models:/...``) needs the
  database itself (no empty database is made by reading);
* ``http(s)``: the server must answer (any HTTP answer) within ``RECONTRAST_TRACKING_TIMEOUT``
  seconds (default 10), probed once per process; and MLflow's retries of a failing request
  are bounded (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 3 with ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``
  1, about 7 s of waiting, where not set: MLflow's defaults, 7 and 2, wait ~250 s).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from ..errors import UserError
from ..runtime import positive_env
from .redaction import redact_uri

DEFAULT_EXPERIMENT = "recontrast"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"

# URI schemes MLflow keeps runs and registered models in (a "+driver" suffix allowed for the databases)
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks",
                    "databricks-uc", "uc")
TIMEOUT_ENV = "RECONTRAST_TRACKING_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0
# MLflow's retries of one failing HTTP request, where the environment does not set them
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_REACHABLE: set[str] = set()  # servers that answered in this process (probed once)


def mlflow_module():
    """``mlflow``, imported on first use."""
    import mlflow  # imported lazily: the pure-ML modules never need it

    return mlflow


def embedded_tracking_uri(workdir: Optional[os.PathLike] = None) -> str:
    """``sqlite:///<workdir>/mlflow.db`` (absolute path; workdir defaults to the cwd)."""
    root = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{root / EMBEDDED_DB}"



def resolve_tracking_uri(
    tracking_uri: Optional[str] = None, workdir: Optional[os.PathLike] = None
) -> str:
    """The explicit argument, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite file."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(workdir)



def tracking_timeout() -> float:
    """Seconds to wait for a tracking server to answer: ``RECONTRAST_TRACKING_TIMEOUT`` (default 10)."""
    return positive_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, "{name}={raw!r}: expected a number of seconds > 0")


def bound_http_retries() -> None:
    """Bound MLflow's retries of a failing HTTP request (module doc) where the environment
    does not already set them (MLflow reads these variables at every request)."""
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:`` URI (relative to the current folder when the URI
    is), or None for an in-memory database."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    rest = rest.split("?", 1)[0]
    if rest.startswith("/"):
        rest = rest[1:]  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


def _unreachable_reason(exc: Exception) -> str:
    """``connection refused``, ``name or service not known``, ...: the innermost cause in words."""
    text = str(exc)
    m = re.findall(r"\[Errno -?\d+\] ([^'\])\"]+)", text)
    if m:
        return m[-1].strip().rstrip(".").lower()
    return type(exc).__name__


def _probe_server(uri: str, shown: str) -> None:
    """Any HTTP answer from the server within :func:`tracking_timeout` seconds, else one line."""
    if uri in _REACHABLE:
        return
    import requests

    timeout = tracking_timeout()
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]  # the probe needs no credentials
    url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/health"
    hint = f"check --tracking-uri / MLFLOW_TRACKING_URI; {TIMEOUT_ENV} sets the wait"
    try:
        requests.get(url, timeout=(timeout, timeout), allow_redirects=False)
    except requests.exceptions.Timeout:
        raise UserError(f"tracking server {shown} did not answer within {timeout:g} s ({hint})") from None
    except requests.exceptions.RequestException as exc:
        raise UserError(f"tracking server {shown} is unreachable: {_unreachable_reason(exc)} ({hint})") from None
    _REACHABLE.add(uri)


def check_tracking_uri(uri: str, *, create: bool = True) -> None:
    """One line (:class:`UserError`, password redacted) for a URI MLflow cannot use (module
    doc); ``create=False``: a reading command, which must not create a database."""
    shown = redact_uri(uri)
    scheme = urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith(("file:", "sqlite:")) else ""
    if len(scheme) <= 1:  # a plain path (MLflow's file store), or a Windows drive letter
        if not create and not Path(uri).exists():
            raise UserError(f"{shown}: no tracking store there (nothing has been tracked or registered; "
                            "check --tracking-uri)")
        return
    base = scheme.split("+", 1)[0]
    if base not in TRACKING_SCHEMES:
        raise UserError(f"{shown}: unsupported tracking URI scheme {scheme!r}; use http(s)://HOST, "
                        "sqlite:///PATH, file:PATH, postgresql://, mysql:// or mssql://")
    if base == "sqlite":
        db = _sqlite_path(uri)
        if db is None:
            return
        folder = db.parent if str(db.parent) else Path(".")
        if not folder.is_dir():
            raise UserError(f"{shown}: the folder {folder} of the tracking database does not exist "
                            "(nothing created; check the path)")
        if not create and not db.exists():
            raise UserError(f"{shown}: no tracking database at {db} (nothing has been tracked or registered "
                            "there; check --tracking-uri)")
    elif base == "file":
        store = Path(urlsplit(uri).path or ".")
        if not create and not store.exists():
            raise UserError(f"{shown}: no tracking store at {store} (nothing has been tracked or registered "
                            "there; check --tracking-uri)")
    elif base in ("http", "https"):
        bound_http_retries()
        _probe_server(uri, shown)


def server_failure(exc: BaseException) -> Optional[str]:
    """One line for an error that is a tracking server failing mid-command (unreachable,
    timing out, answering errors after MLflow's retries), password redacted; None for any
    other error (a bug keeps its traceback)."""
    names = {c.__name__ for c in type(exc).__mro__}
    text = " ".join(str(exc).split())
    mlflow_http = "MlflowException" in names and text.startswith("API request to")
    if not (mlflow_http or names & {"ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout"}
            and "requests" in type(exc).__module__):
        return None
    reason = _unreachable_reason(exc) if "[Errno" in text else text[:200]
    server = re.match(r"API request to (\S+?)(?:/api/|/ajax-api/|\s)", text) if mlflow_http else None
    where = f" {server.group(1)}" if server else ""
    return redact_uri(f"tracking server{where} failed: {reason}")


def _sqlite_artifact_location(uri: str) -> Optional[str]:
    """For a SQLite store, artifacts go to ``mlartifacts/`` next to the database file
    (the embedded default: ``<workdir>/mlartifacts``); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    if not db.is_absolute():
        db = Path(os.getcwd()) / db
    return (db.resolve().parent / EMBEDDED_ARTIFACTS).as_uri()


def configure(
    tracking_uri: Optional[str] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    workdir: Optional[os.PathLike] = None,
) -> str:
    """Point MLflow at the resolved store and select (create) ``experiment``.

    With a SQLite store (the embedded default included) a new experiment's artifacts go
    to ``mlartifacts/`` next to the database; with a server, the server decides.
    Returns the experiment id.
    """
    mlflow = mlflow_module()
    uri = resolve_tracking_uri(tracking_uri, workdir)
    check_tracking_uri(uri, create=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = _sqlite_artifact_location(uri)
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # created concurrently by another step
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def get_client(tracking_uri: Optional[str] = None, workdir: Optional[os.PathLike] = None, *, create: bool = True):
    """An MLflow client of the resolved store, after :func:`check_tracking_uri`;
    ``create=False`` for reading commands (no database is created by reading)."""
    mlflow = mlflow_module()
    uri = resolve_tracking_uri(tracking_uri, workdir)
    check_tracking_uri(uri, create=create)
    return mlflow.MlflowClient(uri, registry_uri=uri)
