"""train as a Kubeflow Trainer TrainJob: N nodes x G GPUs, torchrun (docs/distributed.md)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_job_op(
    dataset: Input[Dataset],
    settings: dict,
    shots: int,
    pipeline_run_id: str,
    kfp_run_id: str,
    num_nodes: int,
    gpus_per_node: int,
    image: str,
    bundle: Output[Model],
    init_encoder: Input[Artifact] = None,
):
    """Starts the TrainJob (``image``: the project image the nodes run; ``num_nodes`` /
    ``gpus_per_node`` > 0 override ``settings.trainjob``), waits for it, and writes the
    trained bundle into ``bundle``; a failed job fails this task with its pod's message."""
    from recontrast_core.steps.artifacts import bundle_metadata
    from recontrast_core.steps.settings import with_run_values
    from recontrast_core.steps.train_job import run_train_job

    cfg = with_run_values(settings, shots=shots, num_nodes=num_nodes, gpus_per_node=gpus_per_node)
    bundle_dir = run_train_job(dataset.uri, bundle.uri, bundle.path, cfg, image=image,
                               encoder_uri=init_encoder.uri if init_encoder else None,
                               pipeline_run_id=pipeline_run_id or kfp_run_id, on_status=print)
    bundle.metadata.update(bundle_metadata(cfg, bundle_dir, bundle.path, adapted=init_encoder is not None,
                                           train_backend="trainjob",
                                           gpus=cfg.trainjob.num_nodes * cfg.trainjob.gpus_per_node))
