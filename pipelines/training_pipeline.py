"""The training pipeline: ingest -> [adapt] -> train -> evaluate -> register.

Parameters: ``settings``, the whole :class:`recontrast_core.config.PipelineConfig` as one
JSON object (its defaults are the only defaults; nothing is kept in sync by hand), plus the
values people set per run, which override it when non-empty: ``source``
(``data.source``), ``adapt_method`` (``"none"`` trains from the backbone's weights;
``"msc"`` / ``"coft"`` run the adaptation step first, ``dsl.If``), ``shots`` (> 0: few-shot,
the same images in adapt and train), ``model_name`` (``registry.model_name``) and
``pipeline_run_id`` (empty: KFP's run id). The local runner lives in
:mod:`pipelines.local_runner`, the KFP API client in :mod:`pipelines.client`.

Cluster settings (kfp-kubernetes; ignored by the local runner, compiled into the YAML):

* train (and adapt): one GPU (``nvidia.com/gpu``), CPU/memory requests, node selector
  :data:`GPU_NODE_SELECTOR`, a toleration for the GPU taint, a memory-backed
  ``/dev/shm`` (PyTorch data loader workers share tensors through it);
* every step: S3 credentials from the Secret :data:`S3_SECRET` and MLflow credentials
  from :data:`MLFLOW_SECRET` (optional), both as env; endpoints / tracking URI from the
  ConfigMap :data:`CONFIG_MAP` (optional). No credential value is in the YAML.
* retries with backoff on the I/O steps (ingest, register; evaluate reads artifacts);
* caching: adapt, train and evaluate are deterministic given their inputs and are cached;
  ingest (reads mutable external data) and register (writes the registry) never are.

The adapt branch and the no-adapt branch each hold their own train -> evaluate ->
register tasks (display names are the same): KFP's local runner cannot yet route an
artifact out of a condition with ``dsl.OneOf``, so the tail is wired by one helper in
both branches instead.
"""

import os
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import adapt_op, evaluate_op, ingest_op, register_op, train_op
from recontrast_core.config import PipelineConfig

PIPELINE_NAME = "recontrast-training"
# KFP parameters cannot hold null: unset (None) settings are left out and take their default.
DEFAULT_SETTINGS = PipelineConfig().model_dump(mode="json", exclude_none=True)

# Kubernetes objects the compiled pipeline refers to (see infra/k8s/base).
S3_SECRET = "recontrast-s3"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_SECRET = "recontrast-mlflow"
MLFLOW_SECRET_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
CONFIG_MAP = "recontrast-config"
CONFIG_MAP_KEYS = {
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = ("nvidia.com/gpu.present", "true")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SHM_SIZE = "8Gi"


def _cluster_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
    kubernetes.use_secret_as_env(
        task, secret_name=MLFLOW_SECRET, secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True
    )
    kubernetes.use_config_map_as_env(
        task, config_map_name=CONFIG_MAP, config_map_key_to_env=CONFIG_MAP_KEYS, optional=True
    )
    return task


def _gpu(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.add_node_selector(task, *GPU_NODE_SELECTOR)
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    return task


def _io_retry(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0,
                          backoff_max_duration="600s")


def _train_evaluate_register(dataset, settings: dict, shots: int, model_name: str, run: dict, encoder=None):
    """train -> evaluate -> register (wired the same in both branches)."""
    extra = {"init_encoder": encoder} if encoder is not None else {}
    train = train_op(dataset=dataset, settings=settings, shots=shots, **run, **extra)
    _cluster_env(_gpu(train.set_display_name("train"), cpu="8", memory="32Gi"))
    train.set_caching_options(True)

    evaluate = evaluate_op(bundle=train.outputs["bundle"], dataset=dataset, settings=settings, **run)
    _cluster_env(_io_retry(evaluate.set_display_name("evaluate")))
    evaluate.set_cpu_request("4").set_memory_request("16Gi")
    evaluate.set_caching_options(True)

    register = register_op(bundle=train.outputs["bundle"], report=evaluate.outputs["report"], dataset=dataset,
                           settings=settings, model_name=model_name, **run)
    _cluster_env(_io_retry(register.set_display_name("register")))
    register.set_caching_options(False)
    return register


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
) -> str:
    """Returns the register step's decision JSON (model name, version, promoted, champion)."""
    run = dict(pipeline_run_id=pipeline_run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    ingest = ingest_op(settings=settings, source=source, **run)
    _cluster_env(_io_retry(ingest.set_display_name("ingest")))
    ingest.set_cpu_request("2").set_memory_request("4Gi")
    ingest.set_caching_options(False)
    dataset = ingest.outputs["dataset"]

    with dsl.If(adapt_method != "none", name="adapt-encoder"):
        adapt = adapt_op(dataset=dataset, settings=settings, adapt_method=adapt_method, shots=shots, **run)
        _cluster_env(_gpu(adapt.set_display_name("adapt"), cpu="8", memory="32Gi"))
        adapt.set_caching_options(True)
        adapted = _train_evaluate_register(dataset, settings, shots, model_name, run, encoder=adapt.outputs["encoder"])
    with dsl.Else(name="from-backbone-weights"):
        plain = _train_evaluate_register(dataset, settings, shots, model_name, run)
    return dsl.OneOf(adapted.outputs["result"], plain.outputs["result"])


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
    }


def compile_pipeline(path: os.PathLike | str) -> Path:
    """Write the pipeline's KFP IR YAML to ``path``; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=training_pipeline, package_path=str(path))
    return path


GOLDEN_PATH = Path(__file__).resolve().parent / "compiled" / "training_pipeline.yaml"


if __name__ == "__main__":  # pragma: no cover
    print(compile_pipeline(GOLDEN_PATH))
