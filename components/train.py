"""train: ReContrast training -> the model bundle (GPU step in the cluster)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_op(
    dataset: Input[Dataset],
    settings: dict,
    shots: int,
    pipeline_run_id: str,
    kfp_run_id: str,
    bundle: Output[Model],
    init_encoder: Input[Artifact] = None,
):
    """Writes the model bundle into ``bundle``; ``init_encoder``: the adapt output, if any."""
    from recontrast_core.steps import train
    from recontrast_core.steps.artifacts import bundle_metadata
    from recontrast_core.steps.settings import with_run_values

    cfg = with_run_values(settings, shots=shots)
    bundle_dir = train(dataset.path, bundle.path, cfg, init_encoder=init_encoder.path if init_encoder else None,
                       pipeline_run_id=pipeline_run_id or kfp_run_id, progress=False)
    bundle.metadata.update(bundle_metadata(cfg, bundle_dir, bundle.path, adapted=init_encoder is not None))
