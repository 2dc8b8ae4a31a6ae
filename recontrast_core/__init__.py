"""recontrast: ReContrast visual anomaly detection, from normal images to a registered model.

The public API (loaded on first use, so ``import recontrast_core`` stays light)::

    import recontrast_core as rc

    manifest = rc.read_dataset("path/to/mvtec_category")
    result = rc.train_model(manifest, rc.TrainConfig(iterations=200), "runs/tile")
    # any model kind (auto: the best of ReContrast, patch-kNN, fused on the validation half)
    fitted = rc.fit_detector(manifest, rc.ModelConfig(kind="auto"), rc.TrainConfig(iterations=200), "runs/auto")
    detector = rc.load_detector(result.bundle_dir)
    detector.predict(["new.png"])          # [{"score", "normalized_score", "decision"}]
    rc.evaluate_bundle(result.bundle_dir, manifest, baseline=rc.BaselineConfig())

Layers (docs/architecture.md): the pure-ML core (these names), ``mlops`` adapters,
``steps`` (the pipeline steps), ``cli``; components/ and pipelines/ at the top level.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_detector": "recontrast_core.bundle",
    "Detector": "recontrast_core.bundle",
    "train_model": "recontrast_core.train",
    "TrainResult": "recontrast_core.train",
    "fit_detector": "recontrast_core.fit",
    "evaluate_bundle": "recontrast_core.evaluate",
    "predict_paths": "recontrast_core.predict",
    "read_dataset": "recontrast_core.data.layouts",
    "Manifest": "recontrast_core.data.manifest",
    "run_adapt": "recontrast_core.adapt",
    "PatchBaseline": "recontrast_core.baseline",
    "decide_promotion": "recontrast_core.promotion",
    "PromotionPolicy": "recontrast_core.promotion",
    "UserError": "recontrast_core.errors",
    **{name: "recontrast_core.config" for name in (
        "PipelineConfig", "TrainConfig", "BackboneConfig", "InferenceConfig", "CalibrationConfig",
        "BaselineConfig", "ModelConfig", "PatchKnnConfig", "AdaptConfig", "CoftConfig", "DataConfig", "RegistryConfig", "TrackingConfig")},
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'recontrast_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
