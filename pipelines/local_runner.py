"""Run the training pipeline (:func:`run_local`) or the batch-scoring pipeline
(:func:`run_local_batch_scoring`) on this machine with KFP's local ``SubprocessRunner``:
the same components as on the cluster, in this Python environment (kfp-kubernetes
settings are ignored)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import uuid
import warnings
from pathlib import Path

from recontrast_core.errors import UserError
from recontrast_core.mlops import tracking as mlflow_tracking

from .training_pipeline import training_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _checkout_importable():
    """Component subprocesses import recontrast_core and components from this checkout even
    when the package is not installed: PYTHONPATH gains the checkout for the run only."""
    before = os.environ.get("PYTHONPATH")
    paths = [str(REPO_ROOT)] + [p for p in (before or "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


# The last line of a Python traceback: "package.module.SomeError: message".
_EXCEPTION_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception|Invalid|Exit)\w*: \S")


class _RunnerLog(io.TextIOBase):
    """Where the local runner's output goes: every line to ``log_path``; the lines that
    say which step runs / finished / failed (or all, ``verbose``) also to stderr."""

    KEY = re.compile(r"Executing task|finished with status|Traceback|Error|error:")
    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, log_path: Path, verbose: bool = False):
        self._file = open(log_path, "a", encoding="utf-8")
        self._verbose = verbose
        self._buf = ""
        self.tail: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        import sys

        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            plain = self.ANSI.sub("", line)
            self._file.write(plain + "\n")
            self.tail = (self.tail + [plain])[-60:]
            if self._verbose or self.KEY.search(plain):
                sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        if self._buf:
            self.write("\n")
        self._file.close()
        super().close()


@contextlib.contextmanager
def _without_retries(pipeline):
    """Run ``pipeline`` (a compiled ``@dsl.pipeline``) with every task's retry policy
    cleared; the pipeline's own spec (what ``compile`` writes) is restored afterwards."""
    graph = pipeline.component_spec.implementation.graph
    local_graph = type(graph)()
    local_graph.CopyFrom(graph)
    dags = [local_graph.root.dag] + [c.dag for c in local_graph.components.values() if c.HasField("dag")]
    for dag in dags:
        for task in dag.tasks.values():
            task.ClearField("retry_policy")
    pipeline.component_spec.implementation.graph = local_graph
    try:
        yield pipeline
    finally:
        pipeline.component_spec.implementation.graph = graph


def run_local(
    arguments: dict,
    pipeline_root: os.PathLike | str = "runs/kfp-local",
    *,
    verbose: bool = False,
    retries: bool = False,
) -> dict:
    """Run the whole pipeline on this machine with KFP's local ``SubprocessRunner``
    (``use_venv=False``: the components run in this Python environment; kfp-kubernetes
    settings are ignored). Returns the register step's decision.

    The cluster's task retries (30 s, 60 s, 120 s backoff) are off unless ``retries``:
    KFP's local runner honours them, and locally they would only repeat a deterministic
    failure (a bad dataset) for minutes; the steps retry transient S3/HTTP errors
    themselves.

    The runner's full log goes to ``<pipeline_root>/<pipeline_run_id>.log``; stderr shows
    the step transitions (everything with ``verbose``) and, on failure, the log's tail.
    When a step fails the MLflow parent run is closed as FAILED and a UserError raised.
    """
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"{arguments.get('pipeline_run_id') or uuid.uuid4().hex[:12]}.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True)
    log = _RunnerLog(log_path, verbose=verbose)
    try:
        task = _execute(training_pipeline, arguments, log, retries)
    except RuntimeError as exc:
        if not verbose:
            sys.stderr.write("\n".join(log.tail[-40:]) + "\n")
        if arguments.get("pipeline_run_id"):
            try:
                tracking_cfg = arguments.get("settings", {}).get("tracking", {})
                with contextlib.redirect_stdout(log):  # MLflow prints "View run ..." links
                    mlflow_tracking.end_pipeline_run(
                        arguments["pipeline_run_id"], "FAILED",
                        experiment=tracking_cfg.get("experiment") or "recontrast",
                        tracking_uri=tracking_cfg.get("tracking_uri") or None,
                    )
            except Exception as track_exc:  # the tracking store itself may be the problem: say so
                sys.stderr.write(f"warning: could not mark the MLflow run FAILED: {track_exc}\n")
        raise _failure(exc, log, log_path) from exc
    finally:
        log.close()
    result = json.loads(task.output)
    result["log"] = str(log_path)
    return result


def _execute(pipeline, arguments: dict, log: _RunnerLog, retries: bool):
    """Run ``pipeline`` with the local runner (already initialised); its output goes to ``log``."""
    # The local runner logs (its own and the steps') to stdout: keep stdout for results.
    with contextlib.redirect_stdout(log), warnings.catch_warnings(), _checkout_importable():
        # Expected locally: cluster settings are ignored, the project image is not used.
        warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
        warnings.filterwarnings("ignore", message=r".*non-Python base image")
        with contextlib.nullcontext() if retries else _without_retries(pipeline):
            return pipeline(**arguments)


def _failure(exc: Exception, log: _RunnerLog, log_path: Path) -> UserError:
    """One line: the runner's message, the failed step's exception (e.g. the dataset
    validation error naming the file) and where the full log is."""
    cause = next((line.strip() for line in reversed(log.tail) if _EXCEPTION_LINE.match(line)), "")
    return UserError(f"local pipeline run failed: {log.ANSI.sub('', str(exc)).rstrip('.')}"
                     + (f"; {cause}" if cause else "") + f" (full log: {log_path})")


def run_local_batch_scoring(arguments: dict, pipeline_root: os.PathLike | str = "runs/kfp-local", *,
                            verbose: bool = False) -> dict:
    """Run the batch-scoring pipeline (:mod:`recontrast_core.pipelines.batch_scoring`) on this machine with
    KFP's local runner, as :func:`run_local` does the training pipeline; returns its summary."""
    from kfp import local

    from .batch_scoring import batch_scoring_pipeline

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"batch-scoring-{uuid.uuid4().hex[:12]}.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    log = _RunnerLog(log_path, verbose=verbose)
    try:
        task = _execute(batch_scoring_pipeline, arguments, log, retries=False)
    except RuntimeError as exc:
        if not verbose:
            sys.stderr.write("\n".join(log.tail[-40:]) + "\n")
        raise _failure(exc, log, log_path) from exc
    finally:
        log.close()
    return {**json.loads(task.output), "log": str(log_path)}
