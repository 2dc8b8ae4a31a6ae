"""KFP lightweight components, one per pipeline step.

Each component is a thin wrapper: import the step from :mod:`recontrast_core.steps`,
call it, write the KFP outputs. They run on the project image (:data:`IMAGE`, which has
the package with its ``[pipeline]`` extra installed), so there is no
``packages_to_install`` and no kfp install at run time. Unit tests can call the plain
function as ``ingest_op.python_func(...)``.
"""

from .image import DEFAULT_IMAGE, IMAGE
from .ingest import ingest_op
from .adapt import adapt_op
from .train import train_op
from .train_job import train_job_op
from .evaluate import evaluate_op
from .register import register_op
from .batch_score import batch_score_op

__all__ = [
    "DEFAULT_IMAGE",
    "IMAGE",
    "ingest_op",
    "adapt_op",
    "train_op",
    "train_job_op",
    "evaluate_op",
    "register_op",
    "batch_score_op",
]
