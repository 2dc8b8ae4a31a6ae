"""The container image every component runs on (built from ``infra/Dockerfile``).

Override at compile time with ``RECONTRAST_IMAGE=registry/name:tag`` (the value is read
when :mod:`components` is first imported).
"""

import os

DEFAULT_IMAGE = "ghcr.io/recontrast/recontrast:0.1.0"
IMAGE = os.environ.get("RECONTRAST_IMAGE") or DEFAULT_IMAGE
