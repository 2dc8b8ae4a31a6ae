"""Where MLflow runs go: the tracking store, the experiment, a client.

* ``MLFLOW_TRACKING_URI`` set (or ``tracking_uri=`` passed): that server / store.
* Otherwise the **embedded default**: ``sqlite:///<workdir>/mlflow.db`` for runs and the
  model registry, artifacts as files under ``<workdir>/mlartifacts``; ``workdir`` is the
  current directory unless passed. Browse it with
  ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` in that directory.
  The usual MLflow variables (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``) apply to S3
  artifact stores as always.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

DEFAULT_EXPERIMENT = "recontrast"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"


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


def get_client(tracking_uri: Optional[str] = None, workdir: Optional[os.PathLike] = None):
    mlflow = mlflow_module()
    uri = resolve_tracking_uri(tracking_uri, workdir)
    return mlflow.MlflowClient(uri, registry_uri=uri)
