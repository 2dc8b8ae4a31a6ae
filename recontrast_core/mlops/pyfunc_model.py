"""Old home of the MLflow pyfunc model, kept for models logged before it moved.

A logged pyfunc model stores its ``ReContrastModel`` instance pickled (``python_model.pkl``),
and the pickle names the class by its import path: every model logged before the move
names ``recontrast_core.mlops.pyfunc_model.ReContrastModel``, so loading one needs that
path to resolve. New code imports :mod:`recontrast_core.mlops.serving.pyfunc_model`."""

from .serving.pyfunc_model import ReContrastModel

__all__ = ["ReContrastModel"]
