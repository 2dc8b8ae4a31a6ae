"""The train step on several nodes: a Kubeflow Trainer TrainJob (docs/distributed.md).

A TrainJob's nodes share no disk with the pipeline's pod, so the step's inputs and output
travel as S3 objects (the KFP artifacts' own URIs):

* :func:`run_train_job`, in the pipeline's pod: starts the TrainJob
  (:mod:`..mlops.trainjob`), waits for it, and copies the trained output folder from S3
  into the pod's output folder (KFP then records it as the ``bundle`` artifact);
* :func:`train_from_s3`, in each process of the TrainJob (``python -m recontrast_core.steps
  train --out s3://...`` under torchrun): each node's first process downloads the dataset
  (and encoder), every process trains (the train step, passed in by its record: this
  module sits below :mod:`.train`), rank 0 uploads the output.

Its record (``train_job``) is the KFP component ``train_job_op``; it is no DVC stage (DVC
runs the train stage on one machine, or under torchrun).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from ..config import PipelineConfig
from ..distributed import barrier, setup, teardown
from .artifacts import PathLike, bundle_metadata, find_bundle_dir
from .records import Port, StepRecord, component_run_id, register_step

WORK_DIR_ENV = "RECONTRAST_WORK_DIR"  # a node-local folder for the staged inputs and output


def upload_dir(local: PathLike, uri: str) -> int:
    """Every file under ``local`` to ``uri`` (``s3://bucket/prefix``, keys relative to
    ``local``); returns how many."""
    from ..mlops.storage import parse_s3_uri, s3_client, with_retries

    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.rstrip("/")
    client = s3_client()
    n = 0
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        key = "/".join(x for x in (prefix, path.relative_to(local).as_posix()) if x)
        with_retries(lambda path=path, key=key: client.upload_file(str(path), bucket, key), f"upload s3://{bucket}/{key}")
        n += 1
    return n


def _download(uri: str, dest: Path) -> Path:
    from ..mlops.storage import download_s3_prefix

    download_s3_prefix(uri, dest)
    (dest / ".s3-index.json").unlink(missing_ok=True)
    return dest


def train_from_s3(train: Callable[..., Path], manifest_uri: str, out_uri: str, settings: PipelineConfig, *,
                  encoder_uri: Optional[str] = None, pipeline_run_id: Optional[str] = None, progress: bool = False,
                  work_dir: Optional[PathLike] = None) -> str:
    """The train step with S3 inputs and output, in one process of a (torchrun) job; returns
    ``out_uri``. Inputs go to ``work_dir`` (``$RECONTRAST_WORK_DIR`` or /tmp) on each node."""
    work = Path(work_dir or os.environ.get(WORK_DIR_ENV) or "/tmp/recontrast-trainjob")
    ctx, _ = setup(settings.train.device)
    try:
        if ctx.local_rank == 0:  # one download per node; its other processes wait
            _download(manifest_uri, work / "dataset")
            if encoder_uri:
                _download(encoder_uri, work / "encoder")
        barrier(ctx)
        out = work / "out"
        train(work / "dataset", out, settings, init_encoder=(work / "encoder") if encoder_uri else None,
              pipeline_run_id=pipeline_run_id, progress=progress)
        if ctx.is_main:
            upload_dir(out, out_uri)
    finally:
        teardown(ctx)
    return out_uri


def run_train_job(dataset_uri: str, out_uri: str, local_out: PathLike, settings: PipelineConfig, *, image: str,
                  encoder_uri: Optional[str] = None, pipeline_run_id: str = "", namespace: Optional[str] = None,
                  poll_s: float = 15.0, client=None, on_status: Optional[Callable[[str], None]] = None) -> Path:
    """Train as a TrainJob of ``settings.trainjob`` (nodes x GPUs, CPU, memory, time limit);
    returns the bundle folder under ``local_out`` (the trained output, copied from
    ``out_uri``). Raises :class:`~recontrast_core.mlops.trainjob.TrainJobFailed` with the
    failing pod's message."""
    from ..distributed import per_process_batch
    from ..mlops import trainjob as tj

    job = settings.trainjob
    per_process_batch(settings.train.batch_size, job.num_nodes * job.gpus_per_node)  # refuse before asking for GPUs
    data, out = tj.artifact_s3_uri(dataset_uri), tj.artifact_s3_uri(out_uri)
    encoder = tj.artifact_s3_uri(encoder_uri) if encoder_uri else None
    command = tj.node_command(data, out, settings.model_dump_json(exclude_none=True), encoder_uri=encoder,
                              pipeline_run_id=pipeline_run_id)
    client = client or tj.trainer_client(namespace)
    run_label = re.sub(r"[^A-Za-z0-9_.-]", "-", pipeline_run_id)[:63].strip("-_.")
    name = tj.submit(client, image=image, command=command, deadline_s=job.timeout_s,
                     labels={"recontrast/pipeline-run-id": run_label} if run_label else None,
                     resources=tj.NodeResources(num_nodes=job.num_nodes, gpus=job.gpus_per_node,
                                                cpu=job.cpu_per_node, memory=job.memory_per_node))
    if on_status:
        on_status(f"TrainJob {name} created")
    tj.wait(client, name, timeout_s=job.timeout_s, poll_s=poll_s, on_status=on_status)
    local_out = Path(local_out)
    shutil.rmtree(local_out / "bundle", ignore_errors=True)
    _download(out, local_out)
    return find_bundle_dir(local_out)


def is_remote(*uris: Optional[str]) -> bool:
    """True when any of the step's locations is an ``s3://`` URI (a TrainJob's process)."""
    return any(str(u).startswith("s3://") for u in uris if u)



# ----------------------------------------------------------------------------- its record
def _component(v: dict) -> None:
    from .settings import with_run_values

    bundle, encoder = v["bundle"], v.get("init_encoder")
    cfg = with_run_values(v["settings"], shots=v["shots"], num_nodes=v["num_nodes"], gpus_per_node=v["gpus_per_node"])
    bundle_dir = run_train_job(v["dataset"].uri, bundle.uri, bundle.path, cfg, image=v["image"],
                               encoder_uri=encoder.uri if encoder else None,
                               pipeline_run_id=component_run_id(v), on_status=print)
    bundle.metadata.update(bundle_metadata(cfg, bundle_dir, bundle.path, adapted=encoder is not None,
                                           train_backend="trainjob",
                                           gpus=cfg.trainjob.num_nodes * cfg.trainjob.gpus_per_node))


RECORD = register_step(StepRecord(
    name="train_job",
    summary="Starts the TrainJob (``image``: the project image the nodes run; ``num_nodes`` / "
            "``gpus_per_node`` > 0 override ``settings.trainjob``), waits for it, and writes the "
            "trained bundle into ``bundle``; a failed job fails this task with its pod's message.",
    run=run_train_job, sections=("shots", "model", "train", "inference", "calibration", "tracking", "trainjob"),
    cli=None, component=_component,
    inputs=(Port("dataset", "Dataset"), Port("init_encoder", "Artifact", optional=True)),
    outputs=(Port("bundle", "Model"),),
    run_values=(("shots", int),),
    kfp_params=(("num_nodes", int), ("gpus_per_node", int), ("image", str)),
))
