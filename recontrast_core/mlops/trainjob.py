"""Kubeflow Trainer v2: the train step as a TrainJob on N nodes x G GPUs (docs/distributed.md).

Through the Trainer SDK (``kubeflow.trainer``, the ``distributed`` extra): a
``CustomTrainerContainer`` on the ``torch-distributed`` runtime with the project image, its
command (``torchrun -m recontrast_core.steps train ...``: the runtime sets torchrun's
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``/``PORT``),
``num_nodes`` and ``resources_per_node`` (``nvidia.com/gpu``); a runtime patch adds what
every pipeline pod gets (S3 and MLflow credentials from their Secrets, endpoints from the
ConfigMap, GPU node placement, a memory-backed ``/dev/shm``). :func:`wait` polls the job
until it completes; a failed job raises :class:`TrainJobFailed` with the failing pod's
reason, exit code and error line.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import first_line
from .cluster import (CONFIG_MAP, CONFIG_MAP_KEYS, GPU_NODE_SELECTOR, GPU_TOLERATION, MLFLOW_SECRET, MLFLOW_SECRET_KEYS,
                      S3_SECRET, S3_SECRET_KEYS, SHM_SIZE)

RUNTIME = "torch-distributed"
NODE = "node"  # the runtime's trainer container and replicated job
LABELS = {"app.kubernetes.io/part-of": "recontrast", "app.kubernetes.io/component": "train"}


class TrainJobFailed(RuntimeError):
    """The TrainJob failed or timed out; the message names the job, the pod and why."""


@dataclass(frozen=True)
class NodeResources:
    """What each of ``num_nodes`` nodes requests: ``gpus`` GPUs (one training process each)."""

    num_nodes: int = 1
    gpus: int = 1
    cpu: str = "8"
    memory: str = "32Gi"

    def per_node(self) -> dict:
        """As Kubernetes quantities (strings: the SDK would send the int 4 as 4.0)."""
        return {"gpu": str(self.gpus), "cpu": str(self.cpu), "memory": str(self.memory)}


def artifact_s3_uri(uri: str) -> str:
    """A KFP artifact URI as ``s3://`` (KFP's MinIO store writes ``minio://bucket/key``, the
    same object through the S3 API); the TrainJob's nodes read and write it with boto3."""
    from ..errors import UserError

    if uri.startswith("s3://"):
        return uri
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://"):]
    raise UserError(f"{uri}: a TrainJob reads and writes artifacts through S3; configure the pipeline root "
                    "as s3:// or minio:// (docs/distributed.md)")


def node_command(dataset_uri: str, out_uri: str, settings_json: str, *, encoder_uri: Optional[str] = None,
                 pipeline_run_id: str = "") -> list[str]:
    """Each node's command: torchrun (its nodes, processes and rendezvous from the runtime's
    ``PET_*`` variables) running the train step on S3 inputs and output."""
    cmd = ["torchrun", "-m", "recontrast_core.steps", "train", "--manifest", dataset_uri, "--out", out_uri,
           "--settings-json", settings_json, "--no-progress"]
    if encoder_uri:
        cmd += ["--encoder", encoder_uri]
    if pipeline_run_id:
        cmd += ["--pipeline-run-id", pipeline_run_id]
    return cmd


def _env_from(kind: str, name: str, keys: dict[str, str], optional: bool) -> list[dict]:
    ref = "secretKeyRef" if kind == "secret" else "configMapKeyRef"
    return [{"name": env, "valueFrom": {ref: {"name": name, "key": key, "optional": optional}}}
            for key, env in keys.items()]


def cluster_patch():
    """The runtime patch for the ``node`` pods: credentials and endpoints as env (values stay
    in the Secrets), GPU node selector and toleration, ``/dev/shm`` in memory."""
    from kubeflow.trainer.options import (ContainerPatch, JobSetSpecPatch, JobSetTemplatePatch, JobSpecPatch,
                                          JobTemplatePatch, PodSpecPatch, PodTemplatePatch, ReplicatedJobPatch,
                                          RuntimePatch, TrainingRuntimeSpecPatch)

    env = (_env_from("secret", S3_SECRET, S3_SECRET_KEYS, optional=False)
           + _env_from("secret", MLFLOW_SECRET, MLFLOW_SECRET_KEYS, optional=True)
           + _env_from("configmap", CONFIG_MAP, CONFIG_MAP_KEYS, optional=True))
    container = ContainerPatch(name=NODE, env=env, volume_mounts=[{"name": "dshm", "mountPath": "/dev/shm"}])
    pod = PodSpecPatch(containers=[container], node_selector=dict([GPU_NODE_SELECTOR]), tolerations=[GPU_TOLERATION],
                       volumes=[{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}])
    job = ReplicatedJobPatch(name=NODE, template=JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(spec=pod))))
    return RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(
        template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[job]))))


def trainer_client(namespace: Optional[str] = None, client_configuration: Any = None):
    """The Trainer SDK's client on this cluster (in a pod: its service account; elsewhere:
    the kube-config); ``client_configuration``: a ``kubernetes.client.Configuration``."""
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

    return TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=client_configuration))


def submit(client, *, image: str, command: list[str], resources: NodeResources, deadline_s: int,
           labels: Optional[dict] = None, name: Optional[str] = None) -> str:
    """Create the TrainJob; returns its name. ``deadline_s``: the cluster stops it after that
    (``activeDeadlineSeconds``), even when nobody waits for it any more."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import ActiveDeadlineSeconds, Labels, Name, TrainerCommand

    trainer = CustomTrainerContainer(image=image, num_nodes=resources.num_nodes,
                                     resources_per_node=resources.per_node())
    options = [TrainerCommand(command=command), cluster_patch(), Labels({**LABELS, **(labels or {})}),
               ActiveDeadlineSeconds(int(deadline_s))]
    if name:
        options.append(Name(name))
    try:
        return client.train(runtime=RUNTIME, trainer=trainer, options=options)
    except (RuntimeError, TimeoutError) as exc:
        raise TrainJobFailed(f"cannot create the TrainJob: {_with_cause(exc)}") from exc


def _with_cause(exc: BaseException) -> str:
    """The SDK's message and the first line of the API error under it (e.g. ``(403)
    Reason: Forbidden``: the service account may not read the runtime, infra/README.md)."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if root is exc:
        return str(exc)
    if getattr(root, "status", None) and getattr(root, "reason", None):  # kubernetes ApiException
        try:
            detail = json.loads(root.body).get("message", "")
        except (TypeError, ValueError, AttributeError):
            detail = ""
        return f"{exc} (HTTP {root.status} {root.reason}{': ' + detail if detail else ''})"
    return f"{exc} ({first_line(root, limit=None)})"


def wait(client, name: str, *, timeout_s: float, poll_s: float = 15.0,
         on_status: Optional[Callable[[str], None]] = None, api_retries: int = 5):
    """Poll the TrainJob until it is Complete (returned); Failed or past ``timeout_s``:
    :class:`TrainJobFailed` with :func:`failure_message` (a timed-out job is deleted, so
    its GPUs are freed). Up to ``api_retries`` API errors in a row are waited out."""
    seen: list[str] = []

    def report(job) -> None:
        if on_status and (not seen or seen[-1] != job.status):
            on_status(job.status)
        seen.append(job.status)

    deadline, errors = time.monotonic() + timeout_s, 0
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= poll_s:
                raise TimeoutError(name)
            return client.wait_for_job_status(name, status={"Complete"}, timeout=remaining, polling_interval=poll_s,
                                              callbacks=[report])
        except TimeoutError:
            why = failure_message(client, name, timed_out=True)
            try:
                client.delete_job(name)
            except RuntimeError:
                pass
            raise TrainJobFailed(why) from None
        except RuntimeError as exc:
            if str(exc).endswith("is Failed"):
                raise TrainJobFailed(failure_message(client, name)) from None
            errors += 1  # the API server unreachable for a moment: training goes on without us
            if errors > api_retries:
                raise TrainJobFailed(f"TrainJob {name}: cannot follow it: {_with_cause(exc)}") from exc
            time.sleep(poll_s)


_ERROR_LINE = re.compile(r"^(error: |[A-Za-z_.]*(Error|Exception|Interrupt): )")


def error_line(log_lines: list[str]) -> str:
    """The line that says why a process failed: the step's ``error: ...`` (a UserError) or
    the last exception line other than torchrun's own ``ChildFailedError``; else the last line."""
    lines = [line.strip() for line in log_lines if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line
    for line in reversed(lines):
        if _ERROR_LINE.match(line) and "ChildFailedError" not in line:
            return line
    return lines[-1] if lines else "(no log)"


def _pod_reason(client, pod_name: str) -> str:
    """The node container's termination: reason and exit code (OOMKilled says so here only)."""
    backend = client.backend
    pod = backend.core_api.read_namespaced_pod(pod_name, backend.namespace)
    for status in (pod.status.container_statuses or []) if pod.status else []:
        term = status.state.terminated if status.name == NODE and status.state else None
        if term is not None:
            return f"{term.reason or 'terminated'}, exit code {term.exit_code}"
    return pod.status.phase if pod.status else "unknown"


def _condition_message(client, name: str) -> str:
    from kubeflow.trainer.constants import constants

    backend = client.backend
    job = backend.custom_api.get_namespaced_custom_object(constants.GROUP, constants.VERSION, backend.namespace,
                                                          constants.TRAINJOB_PLURAL, name)
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
    return ""


def failure_message(client, name: str, timed_out: bool = False) -> str:
    """One line: the TrainJob, its Failed condition, and for the first failed node pod its
    termination and error line (its log); without a failed pod, the latest events."""
    namespace = client.backend.namespace
    head = f"TrainJob {namespace}/{name} " + ("did not complete in time" if timed_out else "failed")
    parts = [head]
    try:
        condition = _condition_message(client, name)
        if condition:
            parts.append(condition)
        job = client.get_job(name)
        failed = [s for s in job.steps if s.status == "Failed"]
        if failed:
            step = sorted(failed, key=lambda s: s.name)[0]
            logs = list(client.get_job_logs(name, step=step.name))
            parts.append(f"pod {step.pod_name} ({step.name}): {_pod_reason(client, step.pod_name)}: "
                         f"{error_line(logs)}")
        else:
            events = client.get_job_events(name)[-3:]
            parts += [f"{e.involved_object_kind} {e.involved_object_name}: {e.reason}: {e.message}" for e in events]
    except Exception as exc:  # the diagnosis must not hide the failure itself
        parts.append(f"(details unavailable: {type(exc).__name__}: {exc})")
    return "; ".join(parts)
