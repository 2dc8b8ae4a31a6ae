"""MLflow around a step: one child run per step under the pipeline's parent run, only
when a pipeline run id is given (otherwise steps log nothing; ``register`` always needs
the registry). Credentials come from the environment; they are never parameters."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import TrackingConfig
from ..runtime import configure_threads


@contextlib.contextmanager
def step_tracking(step: str, pipeline_run_id: Optional[str], tracking: TrackingConfig, params: Any = None,
                  **parent_kw: Any) -> Iterator[Optional[str]]:
    """Yields the child run id (None when not tracking). Every step runs inside it, so this
    is also where a step's torch threads are set from the CPU quota (``configure_threads``)."""
    configure_threads()
    if not pipeline_run_id:
        yield None
        return
    from ..mlops import tracking as mlflow_tracking

    with mlflow_tracking.step_run(pipeline_run_id, step, experiment=tracking.experiment,
                                  tracking_uri=tracking.tracking_uri or None, params=params,
                                  **parent_kw) as run_id:
        yield run_id


def log_artifacts(run_id: Optional[str], local: Path, artifact_path: str, tracking: TrackingConfig) -> None:
    """Upload a file or folder to the step's run (no-op when not tracking or absent)."""
    if run_id is None or not Path(local).exists():
        return
    from ..mlops import tracking as mlflow_tracking

    client = mlflow_tracking.get_client(tracking.tracking_uri or None)
    if Path(local).is_dir():
        client.log_artifacts(run_id, str(local), artifact_path)
    else:
        client.log_artifact(run_id, str(local), artifact_path)
