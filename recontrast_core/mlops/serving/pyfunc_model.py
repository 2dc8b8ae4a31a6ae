"""The model bundle as an MLflow pyfunc model.

``mlflow.pyfunc.load_model(uri).predict(...)`` (and ``mlflow models serve``, docs/serving.md)
takes

* a DataFrame with one or more of the columns (all optional; exactly one value per row,
  rows counted from 0 in error messages)

  - ``path``: an image file readable where the model runs,
  - ``image_b64``: base64 of an encoded image file (PNG, JPEG, BMP, TIFF, WebP; the
    bytes of the file, decoded by the rules of the dataset reader, so a file and its
    base64 score the same),
  - ``image``: an array (uint8/float, HxW or HxWxC), e.g. nested lists in JSON; or

* a list of paths and/or arrays (a single path or array works too) when calling the
  Python model itself (``loaded.unwrap_python_model().predict(None, [...])``); through
  the pyfunc wrapper use the DataFrame / ``{"path": [...]}`` / ``[{"path": ...}]`` forms,
  since MLflow's schema enforcement drops unnamed columns,

and returns a DataFrame with ``score`` (raw anomaly score), ``normalized_score`` (0.5 is
the production threshold) and ``decision`` (True = anomalous); with
``params={"return_map": True}`` also ``anomaly_map`` (a 2-D float array per row, the
bundle's image size). Bad input (no usable column, bad base64, an unreadable image or
file) raises ``MlflowException`` INVALID_PARAMETER_VALUE naming the row (HTTP 400 from the
scoring server).

The bundle directory is stored inside the MLflow model as the artifact ``bundle`` and
loaded with :func:`recontrast_core.bundle.load_detector`; the serving environment needs
the ``recontrast`` package installed (the project's image has it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import mlflow.pyfunc


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


INPUT_COLUMNS = ("path", "image", "image_b64")


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _row_input(i: int, column: str, value: Any):
    from ...data.images import decode_base64_image

    if column == "path":
        return str(value)
    if column == "image_b64":
        return decode_base64_image(value, f"row {i} (image_b64)")
    return _as_image(value)


def _pick(i: int, pairs) -> Any:
    """The one non-missing (column, value) of row ``i`` -> its path / array."""
    given = [(c, v) for c, v in pairs if not _missing(v)]
    if len(given) != 1:
        names = ", ".join(c for c, _ in given) or "none"
        raise ValueError(f"row {i}: give exactly one of {', '.join(INPUT_COLUMNS)} (got {names})")
    return _row_input(i, *given[0])


def _frame_inputs(frame) -> list:
    """One path / array per row of a DataFrame."""
    cols = [c for c in INPUT_COLUMNS if c in frame.columns]
    if not cols:
        raise ValueError(f"expected a column 'path', 'image' or 'image_b64', got {list(frame.columns)}")
    rows = frame[cols].itertuples(index=False, name=None)
    return [_pick(i, zip(cols, row)) for i, row in enumerate(rows)]


def _as_inputs(model_input: Any) -> list:
    """Normalise every accepted input form into a list of paths (str) / numpy arrays
    (``image_b64`` values decoded). Raises ValueError or a UserError naming the row."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return _frame_inputs(model_input)
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
        return _frame_inputs(pd.DataFrame(model_input))
    if isinstance(model_input, Sequence):
        out = []
        for i, item in enumerate(model_input):
            if isinstance(item, (str, os.PathLike)):
                out.append(str(item))
            elif isinstance(item, dict) and any(c in item for c in INPUT_COLUMNS):
                out.append(_pick(i, [(c, item[c]) for c in INPUT_COLUMNS if c in item]))
            else:
                out.append(_as_image(item))
        return out
    raise ValueError(f"unsupported model input type {type(model_input).__name__}")


def _bad_input(exc: Exception):
    """Bad input as MLflow's INVALID_PARAMETER_VALUE: HTTP 400 with the message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(str(exc))


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
        from ...errors import UserError

        return_map = bool((params or {}).get("return_map", False))
        images: list = []
        try:
            images = _as_inputs(model_input)
            if not images:
                return predictions_frame([], return_map)
            results = self._detector.predict(images)
        except (ValueError, UserError) as exc:
            raise _bad_input(_name_row(exc, images)) from exc
        if not return_map:
            results = [{k: v for k, v in r.items() if k != "anomaly_map"} for r in results]
        elif any(r.get("anomaly_map") is None for r in results):
            # ask again for the maps if the detector only returns them on request
            try:
                results = self._detector.predict(images, return_map=True)
            except TypeError:
                pass
        return predictions_frame(results, return_map)


def _name_row(exc: Exception, images: list) -> Exception:
    """A file error from the detector (it names the file) also names the row."""
    path = getattr(exc, "path", None)
    rows = [i for i, im in enumerate(images) if isinstance(im, str) and im == path]
    return ValueError(f"row {rows[0]}: {exc}") if rows else exc


def model_signature():
    """Inputs (all optional, one per row): ``path: string``, ``image: any`` (an array per
    row), ``image_b64: string`` (base64 of an encoded image file); outputs
    score/normalized_score double, decision boolean; param ``return_map: boolean = False``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema(
        [
            ColSpec(DataType.string, "path", required=False),
            ColSpec(AnyType(), "image", required=False),
            ColSpec(DataType.string, "image_b64", required=False),
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

    from ... import __version__

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
