"""adapt: MSC / COFT contrastive adaptation of the encoder (optional step)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def adapt_op(
    dataset: Input[Dataset],
    settings: dict,
    adapt_method: str,
    shots: int,
    pipeline_run_id: str,
    kfp_run_id: str,
    encoder: Output[Artifact],
):
    """Writes encoder.safetensors + encoder.json into ``encoder`` (settings.adapt.*; the
    encoder follows settings.train.backbone). shots=0: all normal training images."""
    from recontrast_core.steps import adapt
    from recontrast_core.steps.settings import with_run_values

    cfg = with_run_values(settings, adapt_method=adapt_method, shots=shots)
    path = adapt(dataset.path, encoder.path, cfg, pipeline_run_id=pipeline_run_id or kfp_run_id, progress=False)
    encoder.metadata.update({"method": adapt_method, "backbone": cfg.train.backbone.name, "file": path.name})
