"""The model bundle as an MLflow pyfunc model.

``mlflow.pyfunc.load_model(uri).predict(...)`` takes

* a DataFrame with a ``path`` column (image files readable where the model runs), or
* a DataFrame with an ``image`` column of arrays (uint8/float, HxW or HxWxC), or
* a list of paths and/or arrays (a single path or array works too) when calling the
  Python model itself (``loaded.unwrap_python_model().predict(None, [...])``); through
  the pyfunc wrapper use the DataFrame / ``{"path": [...]}`` / ``[{"path": ...}]`` forms,
  since MLflow's schema enforcement drops unnamed columns,

and returns a DataFrame with ``score`` (raw anomaly score), ``normalized_score`` (0.5 is
the production threshold) and ``decision`` (True = anomalous); with
``params={"return_map": True}`` also ``anomaly_map`` (a 2-D float array per row).

The bundle directory is stored inside the MLflow model as the artifact ``bundle`` and
loaded with :func:`recontrast_core.bundle.load_detector`; the serving environment needs
the ``recontrast`` package installed (the project's image has it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import mlflow.pyfunc

OUTPUT_COLUMNS = ("score", "normalized_score", "decision")


def _as_image(value: Any):
    """An array from an array or nested lists (JSON requests): integer pixel values in
    0..255 become uint8, anything else float32."""
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype == np.uint8 or arr.dtype.kind == "f":
        return arr
    if arr.dtype.kind in "iub" and arr.size and arr.min() >= 0 and arr.max() <= 255:
        return arr.astype(np.uint8)
    return arr.astype(np.float32)


def _as_inputs(model_input: Any) -> list:
    """Normalise every accepted input form into a list of paths (str) / numpy arrays."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "path" in model_input.columns and model_input["path"].notna().all():
            return [str(p) for p in model_input["path"]]
        if "image" in model_input.columns:
            return [_as_image(v) for v in model_input["image"]]
        if "path" in model_input.columns:
            raise ValueError("column 'path' has missing values")
        raise ValueError(
            f"expected a column 'path' or 'image', got {list(model_input.columns)}"
        )
    if isinstance(model_input, pd.Series):
        return _as_inputs(list(model_input))
    if isinstance(model_input, (str, os.PathLike)):
        return [str(model_input)]
    if isinstance(model_input, np.ndarray):
        # one image (HxW or HxWxC with C in 1/3/4) or a batch (NxHxW[xC]) of images
        if model_input.ndim == 2 or (model_input.ndim == 3 and model_input.shape[-1] in (1, 3, 4)):
            return [model_input]
        return list(model_input)
    if isinstance(model_input, dict):
        import pandas as pd  # noqa: F811

        return _as_inputs(pd.DataFrame(model_input))
    if isinstance(model_input, Sequence):
        out = []
        for item in model_input:
            if isinstance(item, (str, os.PathLike)):
                out.append(str(item))
            elif isinstance(item, dict) and ("path" in item or "image" in item):
                out.append(str(item["path"]) if "path" in item else _as_image(item["image"]))
            else:
                out.append(_as_image(item))
        return out
    raise ValueError(f"unsupported model input type {type(model_input).__name__}")


def predictions_frame(results: list, return_map: bool = False):
    """``Detector.predict`` results -> the output DataFrame."""
    import numpy as np
    import pandas as pd

    cols: dict[str, list] = {
        "score": [float(r["score"]) for r in results],
        "normalized_score": [float(r["normalized_score"]) for r in results],
        "decision": [bool(r["decision"]) for r in results],
    }
    if return_map:
        cols["anomaly_map"] = [
            None if r.get("anomaly_map") is None else np.asarray(r["anomaly_map"], dtype=np.float32)
            for r in results
        ]
    frame = pd.DataFrame(cols)
    return frame.astype({"score": "float64", "normalized_score": "float64", "decision": "bool"})


class ReContrastModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a recontrast model bundle (see the module docstring)."""

    # The explicit signature (model_signature) defines the schema, not type hints on
    # predict(); this opts out of MLflow's type-hint check and its warning at import.
    _skip_type_hint_validation = True

    def __init__(self, device: str = "auto"):
        self.device = device
        self._detector = None

    def load_context(self, context):
        from recontrast_core.bundle import load_detector

        device = os.environ.get("RECONTRAST_DEVICE", self.device)
        self._detector = load_detector(context.artifacts["bundle"], device=device)

    def predict(self, context, model_input, params: Optional[dict] = None):
        if self._detector is None:
            raise RuntimeError("model not loaded: load it with mlflow.pyfunc.load_model")
        return_map = bool((params or {}).get("return_map", False))
        images = _as_inputs(model_input)
        if not images:
            return predictions_frame([], return_map)
        results = self._detector.predict(images)
        if not return_map:
            results = [{k: v for k, v in r.items() if k != "anomaly_map"} for r in results]
        elif any(r.get("anomaly_map") is None for r in results):
            # ask again for the maps if the detector only returns them on request
            try:
                results = self._detector.predict(images, return_map=True)
            except TypeError:
                pass
        return predictions_frame(results, return_map)


def model_signature():
    """Input ``path: string`` (or ``image: any``, an array per row; one of the two);
    output score/normalized_score double, decision boolean; param
    ``return_map: boolean = False``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema(
        [
            ColSpec(DataType.string, "path", required=False),
            ColSpec(AnyType(), "image", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(DataType.double, "score"),
            ColSpec(DataType.double, "normalized_score"),
            ColSpec(DataType.boolean, "decision"),
        ]
    )
    params = ParamSchema([ParamSpec("return_map", DataType.boolean, False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def default_pip_requirements() -> list[str]:
    import mlflow

    from .. import __version__

    return [f"mlflow=={mlflow.__version__}", f"recontrast=={__version__}"]


def log_pyfunc(
    bundle_dir: os.PathLike,
    *,
    name: str = "model",
    example_path: Optional[str] = None,
    registered_model_name: Optional[str] = None,
    run_id: Optional[str] = None,
    pip_requirements: Optional[list[str]] = None,
    device: str = "auto",
):
    """Log ``bundle_dir`` as a pyfunc model named ``name`` in the active run (or ``run_id``).

    Signature: :func:`model_signature`; input example: one row ``{"path": example_path}``
    (pass an image that exists where the model is served, e.g. a test image), else one
    row ``{"image": <32x32x3 uint8 grey image>}``. MLflow loads the model and predicts
    on the example at log time, so a broken bundle shows up as a warning then. ``registered_model_name`` also
    registers it (plain registration; the gated flow uses
    :func:`recontrast_core.mlops.registry.register_candidate`). Returns MLflow's ``ModelInfo``.
    """
    import mlflow
    import pandas as pd

    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise FileNotFoundError(f"model bundle not found: {bundle_dir}")
    if example_path is not None:
        example = pd.DataFrame({"path": [str(example_path)]})
    else:  # portable: a small mid-grey image, so MLflow's serving check really runs
        import numpy as np

        example = pd.DataFrame({"image": [np.full((32, 32, 3), 128, dtype=np.uint8)]})
    kwargs: dict[str, Any] = dict(
        name=name,
        python_model=ReContrastModel(device=device),
        artifacts={"bundle": str(bundle_dir)},
        signature=model_signature(),
        input_example=example,
        pip_requirements=pip_requirements or default_pip_requirements(),
        registered_model_name=registered_model_name,
    )
    active = mlflow.active_run()
    if run_id is not None and (active is None or active.info.run_id != run_id):
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            return mlflow.pyfunc.log_model(**kwargs)
    return mlflow.pyfunc.log_model(**kwargs)
