"""Old home of the MLflow pyfunc model, kept for models logged before it moved.

Models logged before the pyfunc model became code (``model_code.py``) store a pickled
``ReContrastModel`` instance (``python_model.pkl``), and the pickle names the class by its
import path: the oldest name ``recontrast_core.mlops.pyfunc_model.ReContrastModel``, so
loading one needs that path to resolve. New models are logged as code and unpickle nothing
(docs/serving.md); a server that must refuse pickled models altogether sets
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. New code imports
:mod:`recontrast_core.mlops.serving.pyfunc_model`."""

from .serving.pyfunc_model import ReContrastModel

__all__ = ["ReContrastModel"]
