"""train: ReContrast training -> the model bundle (GPU step in the cluster)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_op(
    dataset: Input[Dataset],
    shots: int,
    image_size: int,
    iterations: int,
    batch_size: int,
    backbone: str,
    backbone_weights: str,
    feature_location: str,
    encoder_bn: str,
    seed: int,
    device: str,
    extra_settings: dict,
    pipeline_run_id: str,
    kfp_run_id: str,
    tracking_uri: str,
    experiment: str,
    bundle: Output[Model],
    init_encoder: Input[Artifact] = None,
):
    """Writes the model bundle into ``bundle``; ``init_encoder``: the adapt output, if any.
    ``extra_settings``: ``{"train": {...}, "inference": {...}, "calibration": {...}}``, the
    settings not covered by the other parameters (dotted keys allowed)."""
    from pathlib import Path

    from recontrast_core import steps

    bundle_dir = steps.train(
        dataset.path,
        bundle.path,
        init_encoder=init_encoder.path if init_encoder is not None else None,
        shots=shots or None,
        image_size=image_size,
        iterations=iterations,
        batch_size=batch_size,
        backbone=backbone,
        backbone_weights=backbone_weights,
        feature_location=feature_location,
        encoder_bn=encoder_bn,
        seed=seed,
        device=device,
        inference=extra_settings.get("inference") or None,
        calibration=extra_settings.get("calibration") or None,
        pipeline_run_id=pipeline_run_id or kfp_run_id,
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        progress=False,
        **(extra_settings.get("train") or {}),
    )
    bundle.metadata.update({
        "framework": "recontrast",
        "backbone": backbone,
        "adapted_encoder": init_encoder is not None,
        "bundle_subdir": str(Path(bundle_dir).relative_to(Path(bundle.path))),
    })
