"""Adapters to the outside world, one module each: object storage (S3 and DVC), MLflow
tracking, the MLflow model registry (aliases), secret redaction, and the MLflow pyfunc
model. They import the pure-ML core, never the steps, components, pipelines or CLI."""
