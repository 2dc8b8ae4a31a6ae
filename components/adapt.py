"""adapt: MSC / COFT contrastive adaptation of the encoder (optional step)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def adapt_op(
    dataset: Input[Dataset],
    method: str,
    shots: int,
    epochs: int,
    batch_size: int,
    image_size: int,
    backbone: str,
    backbone_weights: str,
    feature_location: str,
    seed: int,
    device: str,
    extra_settings: dict,
    pipeline_run_id: str,
    kfp_run_id: str,
    tracking_uri: str,
    experiment: str,
    encoder: Output[Artifact],
):
    """Writes encoder.safetensors + encoder.json into ``encoder``. shots=0: all images.
    ``extra_settings["adapt"]``: the other AdaptConfig settings (lr, angular_weight, views,
    coft.*, its own seed; dotted keys allowed); without a seed there, the training seed."""
    from recontrast_core import steps

    settings = {"seed": seed, **(extra_settings.get("adapt") or {})}
    path = steps.adapt(
        dataset.path,
        encoder.path,
        method=method,
        shots=shots or None,
        epochs=epochs,
        batch_size=batch_size,
        image_size=image_size,
        backbone=backbone,
        backbone_weights=backbone_weights,
        feature_location=feature_location,
        device=device,
        pipeline_run_id=pipeline_run_id or kfp_run_id,
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        progress=False,
        **settings,
    )
    encoder.metadata.update({"method": method, "backbone": backbone, "file": path.name})
