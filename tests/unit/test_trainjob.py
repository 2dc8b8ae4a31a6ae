"""The train step as a Kubeflow Trainer TrainJob, against a loopback Kubernetes API stub.

No Kubernetes API server can run here (no cluster, no Docker, no kind), so the lowest level
is stubbed: an ``http.server`` on 127.0.0.1 answers the few Kubernetes REST paths the
Trainer SDK calls, with minimal valid JSON, and records every request. Everything above it
is real: ``kubeflow.trainer.TrainerClient`` and its ``KubernetesBackend``, the
``kubernetes`` client (``CustomObjectsApi``, ``CoreV1Api``) pointed at the stub by a
``kubernetes.client.Configuration``, and :mod:`recontrast_core.mlops.trainjob`. The stub
serves: the ``torch-distributed`` ClusterTrainingRuntime (the SDK reads it to build and
to describe jobs), TrainJob create/get/delete, the job's pods (list, read, logs) and the
namespace's events; a job's status follows a script, one step per GET of the TrainJob.
S3 is a moto server on loopback (``ThreadedMotoServer``).

Checks: the TrainJob body the API receives (runtimeRef ``torch-distributed``, numNodes,
resourcesPerNode with ``nvidia.com/gpu``, the project image, the torchrun command and its
settings, env from the ``recontrast-s3`` / ``recontrast-mlflow`` Secrets and the
``recontrast-config`` ConfigMap by reference, GPU placement, no credential value), the
wait loop (brief API errors waited out), a runtime the service account may not read, a failed job surfacing its failing pod's reason, exit code and error line, a
timed-out job deleted, and the S3 staging on both sides (the pipeline pod's copy-back, and
the nodes' command itself under torchrun with 2 CPU processes: download, training, upload).
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from recontrast_core.config import PipelineConfig
from recontrast_core.errors import UserError
from recontrast_core.mlops import trainjob as tj

pytestmark = pytest.mark.timeout(180)

NS = "recontrast"
IMAGE = "registry.example/ml/recontrast:test"
TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")

RUNTIME = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
        "template": {"spec": {"replicatedJobs": [{
            "name": "node",
            "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                         "spec": {"template": {"spec": {"containers": [
                             {"name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime"}]}}}},
        }]}},
    },
}


def _pod(job: str, index: int, phase: str, terminated: dict | None = None) -> dict:
    status: dict = {"phase": phase}
    if terminated:
        status["containerStatuses"] = [{"name": "node", "ready": False, "restartCount": 0, "image": IMAGE,
                                        "imageID": "", "state": {"terminated": terminated}}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{job}-node-0-{index}-abcde", "namespace": NS, "creationTimestamp": NOW,
                     "labels": {"jobset.sigs.k8s.io/jobset-name": job,
                                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                "batch.kubernetes.io/job-completion-index": str(index)}},
        "spec": {"containers": [{"name": "node", "image": IMAGE,
                                 "resources": {"limits": {"nvidia.com/gpu": "4"}}}]},
        "status": status,
    }


class KubeStub:
    """The fake API server's state: created TrainJobs, the scripted states, the requests.

    ``script``: one entry per GET of the TrainJob (the last repeats), each
    ``(conditions, [(pod phase, terminated state or None), ...])``."""

    def __init__(self, script: list, logs: str = "", events: list | None = None):
        self.script, self.logs, self.events = script, logs, events or []
        self.requests: list[tuple[str, str]] = []
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.gets = 0
        self.deleted: list[str] = []
        self.flaky = 0  # how many TrainJob GETs fail next (HTTP 503)

    def _state(self):
        return self.script[min(self.gets, len(self.script)) - 1] if self.gets else self.script[0]

    def pods(self, name: str) -> list[dict]:
        return [_pod(name, i, phase, term) for i, (phase, term) in enumerate(self._state()[1])]

    def respond(self, method: str, path: str, query: dict, body: bytes):
        self.requests.append((method, path))
        jobs = f"{TRAINER}/namespaces/{NS}/trainjobs"
        if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
            return 200, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kubeflow-trainer-public"},
                         "data": {"kubeflow_trainer_version": "v2.1.0"}}
        if path == f"{TRAINER}/namespaces/{NS}/trainingruntimes/torch-distributed":
            return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
        if path == f"{TRAINER}/clustertrainingruntimes/torch-distributed":
            return 200, RUNTIME
        if method == "POST" and path == jobs:
            job = json.loads(body)
            self.created.append(copy.deepcopy(job))
            job["metadata"].update(namespace=NS, creationTimestamp=NOW)
            self.jobs[job["metadata"]["name"]] = job
            return 201, job
        m = re.fullmatch(rf"{jobs}/([a-z0-9-]+)", path)
        if m and method == "DELETE":
            self.deleted.append(m.group(1))
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if m and self.flaky:
            self.flaky -= 1  # the API server briefly unavailable
            return 503, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503}
        if m:
            self.gets += 1
            job = copy.deepcopy(self.jobs[m.group(1)])
            job["status"] = {"conditions": self._state()[0]}
            return 200, job
        if path == f"/api/v1/namespaces/{NS}/pods":
            job = re.search(r"jobset-name=([a-z0-9-]+)", query.get("labelSelector", [""])[0]).group(1)
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": self.pods(job)}
        m = re.fullmatch(rf"/api/v1/namespaces/{NS}/pods/([a-z0-9-]+?)(/log)?", path)
        if m and m.group(2):
            return 200, self.logs
        if m:
            job = m.group(1).split("-node-")[0]
            return 200, next(p for p in self.pods(job) if p["metadata"]["name"] == m.group(1))
        if path == f"/api/v1/namespaces/{NS}/events":
            return 200, {"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": self.events}
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "message": path}


@pytest.fixture
def kube():
    """``kube(stub)``: the stub on a loopback port; returns a TrainerClient pointed at it."""
    from kubernetes import client as k8s

    servers = []

    def start(stub: KubeStub):
        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code, payload = stub.respond(self.command, url.path, parse_qs(url.query), body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args):  # quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        cfg = k8s.Configuration()
        cfg.host = f"http://127.0.0.1:{server.server_address[1]}"
        return tj.trainer_client(NS, client_configuration=cfg)

    yield start
    for server in servers:
        server.shutdown()


COMPLETE = [{"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "done",
             "lastTransitionTime": NOW}]
FAILED = [{"type": "Failed", "status": "True", "reason": "JobSetFailed",
           "message": "jobset failed: job node-0 has failed", "lastTransitionTime": NOW}]
RUNNING_2 = ([], [("Running", None), ("Running", None)])


def _settings() -> PipelineConfig:
    return PipelineConfig.model_validate({"train": {"batch_size": 16, "iterations": 500},
                                          "trainjob": {"num_nodes": 2, "gpus_per_node": 4}})


def test_the_trainjob_body_the_api_receives(kube, monkeypatch) -> None:
    secret = "fake-secret-never-in-the-body"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    stub = KubeStub([([], []), RUNNING_2, (COMPLETE, [("Succeeded", None)] * 2)])
    client = kube(stub)
    settings = _settings()
    cmd = tj.node_command("s3://art/ds", "s3://art/bundle", settings.model_dump_json(exclude_none=True),
                          encoder_uri="s3://art/enc", pipeline_run_id="run-1")
    name = tj.submit(client, image=IMAGE, command=cmd, deadline_s=3600, labels={"recontrast/pipeline-run-id": "run-1"},
                     resources=tj.NodeResources(num_nodes=2, gpus=4, cpu="16", memory="64Gi"))
    assert [m for m, p in stub.requests if p.endswith("/trainjobs")] == ["POST"]
    body = stub.created[0]
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["name"] == name
    assert body["metadata"]["labels"] == {"app.kubernetes.io/part-of": "recontrast", "app.kubernetes.io/component": "train",
                                          "recontrast/pipeline-run-id": "run-1"}
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    assert spec["activeDeadlineSeconds"] == 3600
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["image"] == IMAGE
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"}
    assert trainer["resourcesPerNode"]["requests"] == trainer["resourcesPerNode"]["limits"]
    assert trainer["command"][:5] == ["torchrun", "-m", "recontrast_core.steps", "train", "--manifest"]
    assert trainer["command"] == cmd and "--pipeline-run-id" in cmd and "s3://art/enc" in cmd
    sent = json.loads(cmd[cmd.index("--settings-json") + 1])
    assert PipelineConfig.model_validate(sent) == settings  # the nodes train with the pipeline's settings
    assert not any(e["name"].startswith("PET_") for e in trainer.get("env") or [])  # the runtime sets torchrun's

    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "trainer.kubeflow.org/kubeflow-sdk"
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    refs = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert refs["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "recontrast-s3", "key": "AWS_ACCESS_KEY_ID",
                                                          "optional": False}}
    assert refs["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "recontrast-s3"
    assert refs["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"] == {"name": "recontrast-mlflow",
                                                                "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        assert refs[key] == {"configMapKeyRef": {"name": "recontrast-config", "key": key, "optional": True}}
    assert secret not in json.dumps(body)

    seen: list[str] = []
    stub.flaky = 2
    job_done = tj.wait(client, name, timeout_s=30, poll_s=0.05, on_status=seen.append)
    assert job_done.status == "Complete" and seen == ["Created", "Running", "Complete"]
    assert stub.gets == 3 and stub.deleted == [] and stub.flaky == 0  # two API errors waited out
    stub.flaky = 10
    with pytest.raises(tj.TrainJobFailed, match=rf"TrainJob {name}: cannot follow it: .*HTTP 503"):
        tj.wait(client, name, timeout_s=30, poll_s=0.01, api_retries=3)


def test_a_failed_job_raises_with_the_failing_pods_message(kube) -> None:
    log = "\n".join([
        "[rank1]: loading 3 images", "error: s3://art/ds: no objects under this prefix",
        "E0101 torch.distributed.elastic.multiprocessing.api: failed (exitcode: 2) local_rank: 1",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "recontrast_core.steps FAILED",
    ])
    error = {"exitCode": 2, "reason": "Error", "startedAt": NOW, "finishedAt": NOW}
    stub = KubeStub([RUNNING_2, (FAILED, [("Succeeded", None), ("Failed", error)])], logs=log)
    client = kube(stub)
    name = tj.submit(client, image=IMAGE, command=["torchrun", "x"], deadline_s=60, resources=tj.NodeResources(2, 4))
    with pytest.raises(tj.TrainJobFailed) as info:
        tj.wait(client, name, timeout_s=30, poll_s=0.05)
    message = str(info.value)
    assert message.startswith(f"TrainJob {NS}/{name} failed; JobSetFailed: jobset failed: job node-0 has failed; ")
    assert message.endswith(f"pod {name}-node-0-1-abcde (node-1): Error, exit code 2: "
                            "error: s3://art/ds: no objects under this prefix")
    assert ("GET", f"/api/v1/namespaces/{NS}/pods/{name}-node-0-1-abcde/log") in stub.requests
    assert stub.deleted == []  # a failed job stays for inspection
    assert tj.error_line(["Traceback (most recent call last):", "  File x", "RuntimeError: CUDA out of memory",
                          "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "]) == \
        "RuntimeError: CUDA out of memory"


def test_an_unschedulable_job_times_out_with_the_events_and_is_deleted(kube) -> None:
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e1", "namespace": NS},
             "involvedObject": {"kind": "Pod", "name": "PODNAME"}, "reason": "FailedScheduling",
             "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.", "firstTimestamp": NOW}
    stub = KubeStub([([], [("Pending", None), ("Pending", None)])])
    client = kube(stub)
    name = tj.submit(client, image=IMAGE, command=["torchrun", "x"], deadline_s=60, resources=tj.NodeResources(2, 4))
    event["involvedObject"]["name"] = f"{name}-node-0-0-abcde"
    stub.events = [event]
    with pytest.raises(tj.TrainJobFailed, match=rf"TrainJob {NS}/{name} did not complete in time; "
                                                r"Pod .*-node-0-0-abcde: FailedScheduling: 0/3 nodes are available: "
                                                r"3 Insufficient nvidia.com/gpu."):
        tj.wait(client, name, timeout_s=0.3, poll_s=0.05)
    assert stub.deleted == [name]  # its GPUs, once scheduled, would otherwise stay taken


def test_a_runtime_the_service_account_cannot_read_is_a_one_line_error(kube) -> None:
    class Forbidden(KubeStub):
        def respond(self, method, path, query, body):
            if path.endswith("/clustertrainingruntimes/torch-distributed"):
                self.requests.append((method, path))
                return 403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                             "code": 403, "message": "x is forbidden"}
            return super().respond(method, path, query, body)

    stub = Forbidden([([], [])])
    with pytest.raises(tj.TrainJobFailed, match=r"cannot create the TrainJob: Failed to get Runtime: torch-distributed "
                                                r".*\(HTTP 403 Forbidden: x is forbidden\)$"):
        tj.submit(kube(stub), image=IMAGE, command=["torchrun"], deadline_s=60, resources=tj.NodeResources())
    assert not any(m == "POST" for m, _ in stub.requests)


def test_artifact_uris_and_the_global_batch_are_checked_before_any_request(kube, tmp_path) -> None:
    from recontrast_core.steps.train_job import run_train_job

    assert tj.artifact_s3_uri("minio://mlpipeline/v2/artifacts/x") == "s3://mlpipeline/v2/artifacts/x"
    assert tj.artifact_s3_uri("s3://b/k") == "s3://b/k"
    with pytest.raises(UserError, match="through S3"):
        tj.artifact_s3_uri("gs://b/k")
    stub = KubeStub([([], [])])
    client = kube(stub)
    bad = _settings().model_copy(update={"trainjob": _settings().trainjob.model_copy(update={"gpus_per_node": 3})})
    with pytest.raises(UserError, match=r"train.batch_size 16 does not divide over 6 processes"):
        run_train_job("s3://a/ds", "s3://a/out", tmp_path, bad, image=IMAGE, client=client)
    assert not any(p.endswith("/trainjobs") for _, p in stub.requests)


# ---------------------------------------------------------------------------------------
# S3 staging: the pipeline pod's side and a node process's side (moto S3 on loopback)
# ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    from recontrast_core.mlops.storage import s3_client

    client = s3_client()
    client.create_bucket(Bucket="art")
    yield client
    server.stop()


def test_the_pipeline_pod_copies_the_trained_output_back(kube, s3, tmp_path) -> None:
    """run_train_job: minio:// artifact URIs become s3:// in the nodes' command; once the
    job completes, the output the nodes uploaded lands in the pod's output folder."""
    from recontrast_core.steps.train_job import run_train_job

    stub = KubeStub([RUNNING_2, (COMPLETE, [("Succeeded", None)] * 2)])
    client = kube(stub)
    s3.put_object(Bucket="art", Key="run/bundle/bundle/bundle.json", Body=b"{}")  # what rank 0 uploads
    s3.put_object(Bucket="art", Key="run/bundle/checkpoints/last.pt", Body=b"ckpt")
    local = tmp_path / "kfp-output"
    statuses: list[str] = []
    bundle = run_train_job("minio://art/run/dataset", "minio://art/run/bundle", local, _settings(), image=IMAGE,
                           pipeline_run_id="kfp run/1", client=client, poll_s=0.05, on_status=statuses.append)
    assert bundle == local / "bundle" and (bundle / "bundle.json").read_text() == "{}"
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == \
        ["bundle/bundle.json", "checkpoints/last.pt"]  # no download index left for KFP to upload
    cmd = stub.created[0]["spec"]["trainer"]["command"]
    assert cmd[cmd.index("--manifest") + 1] == "s3://art/run/dataset" and cmd[cmd.index("--out") + 1] == "s3://art/run/bundle"
    assert stub.created[0]["metadata"]["labels"]["recontrast/pipeline-run-id"] == "kfp-run-1"
    assert stub.created[0]["spec"]["activeDeadlineSeconds"] == 86400
    assert statuses[0].startswith("TrainJob ") and statuses[-1] == "Complete"


def test_the_node_command_downloads_trains_on_two_processes_and_uploads(s3, tiny_mvtec, tmp_path) -> None:
    """What each TrainJob node runs: :func:`tj.node_command` (torchrun, here 2 CPU processes
    on this machine with gloo) on S3 inputs and output. The node's first process downloads
    the ingest output, both train, rank 0 uploads the bundle and the checkpoint."""
    import subprocess
    import sys

    from recontrast_core.steps import ingest
    from recontrast_core.steps.settings import apply_overrides
    from recontrast_core.steps.train_job import upload_dir

    ingested = tmp_path / "ingest"
    settings = apply_overrides(None, {"data.source": str(tiny_mvtec), "data.copy_local": True,
                                      "train.image_size": 32, "train.batch_size": 2, "train.iterations": 2,
                                      "train.decoder_blocks": [1, 1, 1], "train.bottleneck_blocks": 1,
                                      "train.device": "cpu", "train.backbone.weights": "none"})
    ingest(ingested, settings, progress=False)
    upload_dir(ingested, "s3://art/run/dataset")
    cmd = tj.node_command("s3://art/run/dataset", "s3://art/run/bundle", settings.model_dump_json(exclude_none=True))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECONTRAST_WORK_DIR": str(tmp_path / "node"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run(torchrun + cmd[1:], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "s3://art/run/bundle"  # rank 0 alone answers
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="art", Prefix="run/bundle/")["Contents"]}
    # model.kind auto (the default): rank 0 also keeps the ReContrast candidate's bundle
    candidate = {"run/bundle/candidates/recontrast/bundle.json",
                 "run/bundle/candidates/recontrast/model.safetensors"}
    assert keys - candidate == {"run/bundle/bundle/bundle.json", "run/bundle/bundle/model.safetensors",
                                "run/bundle/checkpoints/last.pt", "run/bundle/.recontrast-step.json"}, keys
    marker = json.loads(s3.get_object(Bucket="art", Key="run/bundle/.recontrast-step.json")["Body"].read())
    assert marker["status"] == "complete"  # rank 0 marked the output finished before the upload
    meta = json.loads(s3.get_object(Bucket="art", Key="run/bundle/bundle/bundle.json")["Body"].read())
    assert meta["training"]["iterations"] == 2 and meta["training"]["world_size"] == 2
