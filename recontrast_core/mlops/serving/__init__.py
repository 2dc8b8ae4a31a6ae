"""Model servers: the KServe custom predictor (:mod:`.kserve_predictor`, ``recontrast serve``)
and the MLflow pyfunc model (:mod:`.pyfunc_model`, ``mlflow models serve``).

Nothing is imported here: each server pulls in its own framework (kserve, mlflow) only
when its module is imported."""
