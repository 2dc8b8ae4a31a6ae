"""Cluster settings shared by the compiled pipelines (training, batch scoring): credentials
and endpoints as env from the Secrets / ConfigMap of infra/k8s/base, GPU placement, and
retries with backoff for the steps that do I/O. No credential value is compiled in."""

from kfp import dsl, kubernetes

from recontrast_core.mlops.cluster import (CONFIG_MAP, CONFIG_MAP_KEYS, GPU_NODE_SELECTOR, GPU_RESOURCE,
                                           GPU_TOLERATION, MLFLOW_SECRET, MLFLOW_SECRET_KEYS, S3_SECRET,
                                           S3_SECRET_KEYS, SHM_SIZE)


def cluster_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
    kubernetes.use_secret_as_env(
        task, secret_name=MLFLOW_SECRET, secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True
    )
    kubernetes.use_config_map_as_env(
        task, config_map_name=CONFIG_MAP, config_map_key_to_env=CONFIG_MAP_KEYS, optional=True
    )
    return task


def gpu(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.add_node_selector(task, *GPU_NODE_SELECTOR)
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    return task


def io_retry(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0,
                          backoff_max_duration="600s")
