"""The batch-scoring pipeline: one task, ``batch_score`` (components/batch_score.py), that
scores the images under ``input_uri`` with ``model_uri`` into ``output_uri`` through
:func:`recontrast_core.mlops.batch_scoring.run_batch_scoring`, the function behind
``recontrast predict --model ... s3://...`` (docs/batch_scoring.md).

Parameters: ``model_uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``,
an ``s3://`` bundle), ``input_uri`` (an ``s3://`` prefix or a folder the pod sees),
``output_uri``, ``chunk_size`` (images per committed part), ``device`` and
``run_subfolder`` (true: results go to ``output_uri/<KFP run id>/``, a fresh folder per
run, e.g. per scheduled run; false: to ``output_uri`` itself, so a run scores only the
images not already there, while the model is the same).

Cluster settings: the training pipeline's (S3 and MLflow credentials from Secrets, the
endpoints from the ConfigMap, :mod:`recontrast_core.pipelines.training_pipeline`), CPU/memory requests,
retries with backoff (a retried task resumes from its parts), never cached (the inputs and
the alias change outside KFP). Local runs: :func:`recontrast_core.pipelines.local_runner.run_local_batch_scoring`;
scheduling: ``recontrast pipeline batch-scoring schedule`` (:mod:`recontrast_core.pipelines.client`).

Regenerate the golden YAML after an intended change with::

    env -u RECONTRAST_IMAGE python -m recontrast_core.pipelines.batch_scoring
"""

import os
from pathlib import Path

from kfp import dsl

from recontrast_core.components import batch_score_op

from .compile import compile_to
from .task_settings import cluster_env, io_retry

PIPELINE_NAME = "recontrast-batch-scoring"
DEFAULT_MODEL_URI = "models:/recontrast@champion"
DEFAULT_CHUNK_SIZE = 256


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="ReContrast batch scoring: images under an s3:// prefix -> results.parquet/.csv + overlays",
)
def batch_scoring_pipeline(
    input_uri: str,
    output_uri: str,
    model_uri: str = DEFAULT_MODEL_URI,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str = "auto",
    run_subfolder: bool = True,
) -> str:
    """Returns the batch_score task's summary JSON."""
    task = batch_score_op(model_uri=model_uri, input_uri=input_uri, output_uri=output_uri, chunk_size=chunk_size,
                          device=device, run_subfolder=run_subfolder, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    cluster_env(io_retry(task.set_display_name("batch-score")))
    task.set_cpu_request("4").set_memory_request("8Gi").set_memory_limit("8Gi")
    task.set_caching_options(False)
    return task.outputs["Output"]


def pipeline_arguments(input_uri: str, output_uri: str, model_uri: str = DEFAULT_MODEL_URI,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, device: str = "auto", run_subfolder: bool = True) -> dict:
    """The pipeline's arguments (one place that names them)."""
    return {"input_uri": input_uri, "output_uri": output_uri, "model_uri": model_uri, "chunk_size": chunk_size,
            "device": device, "run_subfolder": run_subfolder}


def compile_pipeline(path: os.PathLike | str) -> Path:
    """Write the pipeline's KFP IR YAML to ``path``; returns it."""
    return compile_to(batch_scoring_pipeline, path)


GOLDEN_PATH = Path(__file__).resolve().parent / "compiled" / "batch_scoring.yaml"


if __name__ == "__main__":  # pragma: no cover
    print(compile_pipeline(GOLDEN_PATH))
