"""The MLflow model file of the recontrast pyfunc model ("models from code").

:func:`recontrast_core.mlops.serving.pyfunc_model.log_pyfunc` logs this file as the model:
MLflow copies it into the model folder (``model_code.py``) and, at load, runs it and takes
the model that :func:`mlflow.models.set_model` set. It holds no state: the weights and
settings are the bundle artifact (``model.safetensors`` + ``bundle.json``, read by
:func:`recontrast_core.bundle.load_detector`), the device is the model's ``model_config``.
Nothing is unpickled.

MLflow imports it under a generated module name, so imports here are absolute.
"""

import mlflow.models

from recontrast_core.mlops.serving.pyfunc_model import ReContrastModel

mlflow.models.set_model(ReContrastModel())
