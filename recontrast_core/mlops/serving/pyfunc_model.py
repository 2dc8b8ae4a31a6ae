"""The model bundle as an MLflow pyfunc model, logged as code (docs/serving.md).

``mlflow.pyfunc.load_model(uri).predict(...)`` (and ``mlflow models serve``) takes

* a DataFrame with one or more of the columns (all optional; exactly one value per row,
  rows counted from 0 in error messages)

  - ``image_b64``: base64 of an encoded image file (PNG, JPEG, BMP, TIFF, WebP; the
    bytes of the file, decoded by the rules of the dataset reader, so a file and its
    base64 score the same),
  - ``image``: an array (uint8/float, HxW or HxWxC), e.g. nested lists in JSON,
  - ``path``: an image file where the model runs, **off unless** the environment sets
    ``RECONTRAST_ALLOWED_PATH_ROOT`` to a folder (read at load and at every predict): then
    a path (relative ones are taken under the root) must resolve, symlinks followed, to a
    file under that folder; any other path gets one message that does not say whether it
    exists; or

* a list of paths and/or arrays (a single path or array works too) when calling the
  Python model itself (``loaded.unwrap_python_model().predict(None, [...])``); through
  the pyfunc wrapper use the DataFrame / ``{"path": [...]}`` / ``[{"path": ...}]`` forms,
  since MLflow's schema enforcement drops unnamed columns,

and returns a DataFrame with ``score`` (raw anomaly score), ``normalized_score`` (0.5 is
the production threshold) and ``decision`` (True = anomalous); with
``params={"return_map": True}`` also ``anomaly_map`` (a 2-D float array per row, the
bundle's image size). Bad input (no usable column, bad base64, an unreadable image or
file, a refused path) raises ``MlflowException`` INVALID_PARAMETER_VALUE naming the row
(HTTP 400 from the scoring server).

The logged model (:func:`log_pyfunc`, :func:`save_pyfunc`) is *code*, not a pickle: the
model file is :mod:`recontrast_core.mlops.serving.model_code` (``model_code.py`` in the
model folder), the bundle directory is the artifact ``bundle`` (safetensors + JSON, loaded
with :func:`recontrast_core.bundle.load_detector`), and the project's wheel is the artifact
that ``requirements.txt`` installs (:mod:`.pyfunc_env`), with ``constraints.txt`` pinning
the logging environment's versions. Models logged before (a pickled ``ReContrastModel``
in ``python_model.pkl``) still load through this class (``recontrast_core.mlops.pyfunc_model``
keeps their import path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import mlflow.pyfunc

PATH_ROOT_ENV = "RECONTRAST_ALLOWED_PATH_ROOT"
PATH_OFF = (f"path input is off on this server (it allows files under one folder when started with "
            f"{PATH_ROOT_ENV}); send image_b64")
PATH_REFUSED = "path refused: not a file under the server's allowed folder"
# the model file logged as the model (models from code)
MODEL_CODE = Path(__file__).with_name("model_code.py")


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


def allowed_path_root() -> Optional[Path]:
    """The folder ``path`` inputs must resolve into (``RECONTRAST_ALLOWED_PATH_ROOT``, symlinks
    resolved), or None when unset or empty (path input off). A value that is not an existing
    folder raises ValueError."""
    value = os.environ.get(PATH_ROOT_ENV, "").strip()
    if not value:
        return None
    try:
        root = Path(value).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        root = None
    if root is None or not root.is_dir():
        raise ValueError(f"{PATH_ROOT_ENV}={value!r}: not an existing folder")
    return root


def checked_path(row: int, value: str, root: Optional[Path]) -> str:
    """``value`` resolved (under ``root`` when relative, every symlink followed) if it lies
    under ``root``; else ValueError naming only the row: :data:`PATH_OFF` without a root,
    :data:`PATH_REFUSED` for any path outside it, whether or not it exists."""
    if root is None:
        raise ValueError(f"row {row} (path): {PATH_OFF}")
    try:
        if "\x00" in value:
            raise ValueError("NUL in path")
        resolved = (root / value).resolve()  # an absolute value replaces the root; no ~ expansion
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unreadable component
        raise ValueError(f"row {row} (path): {PATH_REFUSED}") from None
    if resolved == root or not resolved.is_relative_to(root):
        raise ValueError(f"row {row} (path): {PATH_REFUSED}")
    return str(resolved)


def _gate_paths(images: list) -> list:
    """The ``path`` inputs of ``images`` (strings) checked against the allowed root."""
    if not any(isinstance(im, str) for im in images):
        return images
    try:
        root = allowed_path_root()
    except ValueError:  # misconfigured after load (the folder went away): paths are off
        root = None
    return [checked_path(i, im, root) if isinstance(im, str) else im for i, im in enumerate(images)]


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
    """pyfunc wrapper of a recontrast model bundle (see the module docstring).

    Logged as code, the instance is made by ``model_code.py`` and the device comes from
    the model's ``model_config`` (``{"device": ...}``); ``RECONTRAST_DEVICE`` overrides it.
    Models logged before were pickled instances whose ``device`` attribute holds it."""

    # The explicit signature (model_signature) defines the schema, not type hints on
    # predict(); this opts out of MLflow's type-hint check and its warning at import.
    _skip_type_hint_validation = True

    def __init__(self, device: str = "auto"):
        self.device = device
        self._detector = None

    def load_context(self, context):
        from mlflow.exceptions import MlflowException

        from recontrast_core.bundle import load_detector

        try:
            allowed_path_root()  # a bad RECONTRAST_ALLOWED_PATH_ROOT stops the start
        except ValueError as exc:
            raise MlflowException(str(exc)) from None
        config = getattr(context, "model_config", None) or {}
        device = os.environ.get("RECONTRAST_DEVICE") or config.get("device") or getattr(self, "device", "auto")
        self._detector = load_detector(context.artifacts["bundle"], device=device)

    def predict(self, context, model_input, params: Optional[dict] = None):
        if getattr(self, "_detector", None) is None:
            raise RuntimeError("model not loaded: load it with mlflow.pyfunc.load_model")
        from ...errors import UserError

        return_map = bool((params or {}).get("return_map", False))
        images: list = []
        try:
            images = _gate_paths(_as_inputs(model_input))
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


def default_pip_requirements(wheel: os.PathLike, constraints: Optional[os.PathLike] = None) -> list[str]:
    """``mlflow==<this version>``, the wheel by its path inside the model folder
    (``artifacts/<wheel name>``, relative: MLflow installs from the model folder) and, if
    given, ``-c <constraints file>`` (MLflow copies it in as ``constraints.txt``)."""
    import mlflow

    reqs = [f"mlflow=={mlflow.__version__}", f"artifacts/{Path(wheel).name}"]
    return reqs + ([f"-c {os.fspath(constraints)}"] if constraints is not None else [])


def _model_kwargs(bundle_dir: os.PathLike, example_path: Optional[str], pip_requirements: Optional[list[str]],
                  device: str, wheel: Optional[os.PathLike], workdir: Path) -> dict[str, Any]:
    """The arguments of ``mlflow.pyfunc.log_model`` / ``save_model`` shared by both."""
    import pandas as pd

    from .pyfunc_env import environment_pins, project_wheel, wheel_requires

    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise FileNotFoundError(f"model bundle not found: {bundle_dir}")
    if example_path is not None:
        example = pd.DataFrame({"path": [str(example_path)]})
    else:  # portable: a small mid-grey image, so MLflow's serving check really runs
        import numpy as np

        example = pd.DataFrame({"image": [np.full((32, 32, 3), 128, dtype=np.uint8)]})
    whl = project_wheel(wheel)
    if pip_requirements is None:
        import mlflow

        constraints = workdir / "constraints.txt"
        pins = environment_pins([*wheel_requires(whl), f"mlflow=={mlflow.__version__}"])
        constraints.write_text("\n".join(pins) + "\n")
        pip_requirements = default_pip_requirements(whl, constraints)
    return dict(
        python_model=str(MODEL_CODE),
        artifacts={"bundle": str(bundle_dir), "wheel": str(whl)},
        model_config={"device": device},
        signature=model_signature(),
        input_example=example,
        pip_requirements=pip_requirements,
    )


def save_pyfunc(
    bundle_dir: os.PathLike,
    path: os.PathLike,
    *,
    example_path: Optional[str] = None,
    pip_requirements: Optional[list[str]] = None,
    device: str = "auto",
    wheel: Optional[os.PathLike] = None,
) -> Path:
    """Write the model (as :func:`log_pyfunc` logs it) into the new folder ``path``, no
    tracking server involved (``mlflow.pyfunc.load_model(path)``, ``mlflow models serve -m
    path``, ``mlflow models build-docker -m path``). Returns ``path``."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="recontrast-pyfunc-") as tmp:
        kwargs = _model_kwargs(bundle_dir, example_path, pip_requirements, device, wheel, Path(tmp))
        mlflow.pyfunc.save_model(path=os.fspath(path), **kwargs)
    return Path(path)


def log_pyfunc(
    bundle_dir: os.PathLike,
    *,
    name: str = "model",
    example_path: Optional[str] = None,
    registered_model_name: Optional[str] = None,
    run_id: Optional[str] = None,
    pip_requirements: Optional[list[str]] = None,
    device: str = "auto",
    wheel: Optional[os.PathLike] = None,
):
    """Log ``bundle_dir`` as a pyfunc model named ``name`` in the active run (or ``run_id``).

    The model is code (``model_code.py``) plus artifacts: ``bundle`` (the bundle directory)
    and ``wheel`` (this project's wheel: ``wheel``, else ``RECONTRAST_WHEEL``, else built
    from the source tree or repacked from the installation, :mod:`.pyfunc_env`). Unless
    ``pip_requirements`` is given, ``requirements.txt`` is ``mlflow==<version>``, the wheel
    by its path in the model and ``-c constraints.txt`` (the versions installed here of
    everything the wheel and MLflow pull in). ``device`` is the model's ``model_config``.

    Signature: :func:`model_signature`; input example: one row ``{"path": example_path}``
    (scored at log time only where ``RECONTRAST_ALLOWED_PATH_ROOT`` allows it), else one
    row ``{"image": <32x32x3 uint8 grey image>}``. MLflow loads the model and predicts
    on the example at log time, so a broken bundle shows up as a warning then. ``registered_model_name`` also
    registers it (plain registration; the gated flow uses
    :func:`recontrast_core.mlops.registry.register_candidate`). Returns MLflow's ``ModelInfo``.
    """
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="recontrast-pyfunc-") as tmp:
        kwargs: dict[str, Any] = dict(
            name=name,
            registered_model_name=registered_model_name,
            **_model_kwargs(bundle_dir, example_path, pip_requirements, device, wheel, Path(tmp)),
        )
        active = mlflow.active_run()
        if run_id is not None and (active is None or active.info.run_id != run_id):
            with mlflow.start_run(run_id=run_id, nested=active is not None):
                return mlflow.pyfunc.log_model(**kwargs)
        return mlflow.pyfunc.log_model(**kwargs)
