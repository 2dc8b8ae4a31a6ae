"""The training pipeline: ingest -> [adapt] -> train -> evaluate -> register.

Parameters: ``settings``, the whole :class:`recontrast_core.config.PipelineConfig` as one
JSON object (its defaults are the only defaults; nothing is kept in sync by hand), plus the
values people set per run, which override it when non-empty: ``source``
(``data.source``), ``adapt_method`` (``"none"`` trains from the backbone's weights;
``"msc"`` / ``"coft"`` run the adaptation step first, ``dsl.If``), ``shots`` (> 0: few-shot,
the same images in adapt and train), ``model_name`` (``registry.model_name``),
``pipeline_run_id`` (empty: KFP's run id), ``train_backend`` (``"pod"``: train in the
train step's GPU pod; ``"trainjob"``: a Kubeflow Trainer TrainJob on ``num_nodes`` x
``gpus_per_node`` GPUs, 0 = ``trainjob.*`` of the settings; docs/distributed.md). The local runner lives in
:mod:`recontrast_core.pipelines.local_runner`, the KFP API client in :mod:`recontrast_core.pipelines.client`.

Cluster settings (kfp-kubernetes; ignored by the local runner, compiled into the YAML):

* train in its pod (and adapt): one GPU (``nvidia.com/gpu``), CPU/memory requests, node selector
  :data:`GPU_NODE_SELECTOR`, a toleration for the GPU taint, a memory-backed
  ``/dev/shm`` (PyTorch data loader workers share tensors through it); train as a
  TrainJob: a small pod that creates the TrainJob (whose nodes get the GPUs, the same
  placement and env: :mod:`recontrast_core.mlops.trainjob`) and waits for it;
* every step: S3 credentials from the Secret :data:`S3_SECRET` and MLflow credentials
  from :data:`MLFLOW_SECRET` (optional), both as env; endpoints / tracking URI from the
  ConfigMap :data:`CONFIG_MAP` (optional). No credential value is in the YAML.
* retries with backoff on the I/O steps (ingest, register; evaluate reads artifacts);
* caching: adapt, train and evaluate are deterministic given their inputs and are cached;
  ingest (reads mutable external data) and register (writes the registry) never are.

The adapt branch and the no-adapt branch each hold their own train -> evaluate ->
register tasks (display names are the same): KFP's local runner cannot yet route an
artifact out of a condition with ``dsl.OneOf``, so the tail is wired by one helper in
both branches instead. The backend branches each hold one sub-pipeline of all that
(:func:`_after_ingest`): KFP takes one ``dsl.OneOf`` per pipeline level.
"""

import os
from pathlib import Path

from kfp import dsl
from kfp.dsl import Dataset, Input

from recontrast_core.components import IMAGE, adapt_op, evaluate_op, ingest_op, register_op, train_job_op, train_op
from recontrast_core.config import PipelineConfig

# Kubernetes objects the compiled pipeline refers to (infra/k8s/base); the TrainJob backend
# uses the same names, so they live in one module.
from recontrast_core.mlops.cluster import (CONFIG_MAP, GPU_NODE_SELECTOR, MLFLOW_SECRET,  # noqa: F401
                                           S3_SECRET)

from .compile import compile_to
from .task_settings import cluster_env, gpu, io_retry

PIPELINE_NAME = "recontrast-training"
# KFP parameters cannot hold null: unset (None) settings are left out and take their default.
DEFAULT_SETTINGS = PipelineConfig().model_dump(mode="json", exclude_none=True)


def _train(dataset, settings: dict, shots: int, run: dict, encoder, backend: str, num_nodes, gpus_per_node):
    """The train task: in its own GPU pod, or (``backend == "trainjob"``) a small pod that
    runs the training as a Kubeflow Trainer TrainJob on ``num_nodes`` x ``gpus_per_node`` GPUs."""
    extra = {"init_encoder": encoder} if encoder is not None else {}
    if backend == "trainjob":
        train = train_job_op(dataset=dataset, settings=settings, shots=shots, num_nodes=num_nodes,
                             gpus_per_node=gpus_per_node, image=IMAGE, **run, **extra)
        cluster_env(train.set_display_name("train (TrainJob)"))
        train.set_cpu_request("1").set_memory_request("2Gi").set_memory_limit("2Gi")
    else:
        train = train_op(dataset=dataset, settings=settings, shots=shots, **run, **extra)
        cluster_env(gpu(train.set_display_name("train"), cpu="8", memory="32Gi"))
    train.set_caching_options(True)
    return train


def _train_evaluate_register(dataset, settings: dict, shots: int, model_name: str, run: dict, backend: str,
                             num_nodes, gpus_per_node, encoder=None):
    """train -> evaluate -> register (wired the same in every branch)."""
    train = _train(dataset, settings, shots, run, encoder, backend, num_nodes, gpus_per_node)
    evaluate = evaluate_op(bundle=train.outputs["bundle"], dataset=dataset, settings=settings, **run)
    cluster_env(io_retry(evaluate.set_display_name("evaluate")))
    evaluate.set_cpu_request("4").set_memory_request("16Gi")
    evaluate.set_caching_options(True)

    register = register_op(bundle=train.outputs["bundle"], report=evaluate.outputs["report"], dataset=dataset,
                           settings=settings, model_name=model_name, **run)
    cluster_env(io_retry(register.set_display_name("register")))
    register.set_caching_options(False)
    return register


def _after_ingest(backend: str):
    """[adapt ->] train -> evaluate -> register on one training backend, as a pipeline of
    its own: KFP returns one ``dsl.OneOf`` per pipeline level (the adapt branches here, the
    backend branches in :func:`training_pipeline`), and its local runner cannot pass an
    artifact out of a branch, so the tail is wired in each branch."""

    @dsl.pipeline(name=f"after-ingest-{backend}", description=f"adapt -> train ({backend}) -> evaluate -> register")
    def after_ingest(dataset: Input[Dataset], settings: dict, adapt_method: str, shots: int, model_name: str,
                     pipeline_run_id: str, num_nodes: int, gpus_per_node: int) -> str:
        run = dict(pipeline_run_id=pipeline_run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        tail = dict(dataset=dataset, settings=settings, shots=shots, model_name=model_name, run=run, backend=backend,
                    num_nodes=num_nodes, gpus_per_node=gpus_per_node)
        with dsl.If(adapt_method != "none", name="adapt-encoder"):
            adapt = adapt_op(dataset=dataset, settings=settings, adapt_method=adapt_method, shots=shots, **run)
            cluster_env(gpu(adapt.set_display_name("adapt"), cpu="8", memory="32Gi"))
            adapt.set_caching_options(True)
            adapted = _train_evaluate_register(**tail, encoder=adapt.outputs["encoder"])
        with dsl.Else(name="from-backbone-weights"):
            plain = _train_evaluate_register(**tail)
        return dsl.OneOf(adapted.outputs["result"], plain.outputs["result"])

    return after_ingest


_IN_POD, _AS_TRAINJOB = _after_ingest("pod"), _after_ingest("trainjob")


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="ReContrast anomaly detection: ingest -> adapt -> train -> evaluate -> register",
)
def training_pipeline(
    settings: dict = DEFAULT_SETTINGS,
    source: str = "",
    adapt_method: str = "none",
    shots: int = 0,
    model_name: str = "",
    pipeline_run_id: str = "",
    train_backend: str = "pod",
    num_nodes: int = 0,
    gpus_per_node: int = 0,
) -> str:
    """Returns the register step's decision JSON (model name, version, promoted, champion)."""
    ingest = ingest_op(settings=settings, source=source, pipeline_run_id=pipeline_run_id,
                       kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    cluster_env(io_retry(ingest.set_display_name("ingest")))
    ingest.set_cpu_request("2").set_memory_request("4Gi")
    ingest.set_caching_options(False)
    rest = dict(dataset=ingest.outputs["dataset"], settings=settings, adapt_method=adapt_method, shots=shots,
                model_name=model_name, pipeline_run_id=pipeline_run_id, num_nodes=num_nodes,
                gpus_per_node=gpus_per_node)
    with dsl.If(train_backend == "trainjob", name="train-as-trainjob"):
        on_job = _AS_TRAINJOB(**rest).set_display_name("adapt, train (TrainJob), evaluate, register")
    with dsl.Else(name="train-in-pod"):
        in_pod = _IN_POD(**rest).set_display_name("adapt, train, evaluate, register")
    return dsl.OneOf(on_job.output, in_pod.output)


def pipeline_arguments(cfg: PipelineConfig, pipeline_run_id: str = "") -> dict:
    """The pipeline's arguments for ``cfg``: the whole configuration as ``settings`` and the
    per-run values taken from it."""
    return {
        "settings": cfg.model_dump(mode="json", exclude_none=True),
        "source": cfg.data.source,
        "adapt_method": cfg.adapt_method,
        "shots": cfg.shots or 0,
        "model_name": cfg.registry.model_name,
        "pipeline_run_id": pipeline_run_id,
        "train_backend": cfg.train_backend,
        "num_nodes": cfg.trainjob.num_nodes,
        "gpus_per_node": cfg.trainjob.gpus_per_node,
    }


def compile_pipeline(path: os.PathLike | str) -> Path:
    """Write the pipeline's KFP IR YAML to ``path``; returns it."""
    return compile_to(training_pipeline, path)


GOLDEN_PATH = Path(__file__).resolve().parent / "compiled" / "training_pipeline.yaml"


if __name__ == "__main__":  # pragma: no cover
    print(compile_pipeline(GOLDEN_PATH))
