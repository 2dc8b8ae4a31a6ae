"""KFP lightweight components, one per step record (:mod:`recontrast_core.steps.records`).

Each component is generated from its record (:mod:`.factory`): its inputs, outputs and
parameters are the record's, its body hands them to the step's KFP adapter. They run on
the project image (:data:`IMAGE`, which has the package with its ``[pipeline]`` extra
installed), so there is no ``packages_to_install`` and no kfp install at run time. Unit
tests can call the plain function as ``ingest_op.python_func(...)``.
"""

from recontrast_core.steps import step_records

from .factory import make_component
from .image import DEFAULT_IMAGE, IMAGE

OPS = {record.op_name: make_component(record) for record in step_records()}
globals().update(OPS)  # ingest_op, adapt_op, train_op, train_job_op, evaluate_op, register_op, batch_score_op

__all__ = ["DEFAULT_IMAGE", "IMAGE", "OPS", *OPS]
