"""End-to-end fixtures: the real loopback servers of the integration suite.

``moto_s3`` (a moto S3 server) and ``mlflow_server`` (``mlflow server`` with its artifact
store on that S3) are defined once in ``tests/integration/conftest.py``; importing them
here makes them available to the e2e tests too.
"""

from tests.integration.conftest import mlflow_server, moto_s3  # noqa: F401
