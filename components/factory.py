"""KFP lightweight components made from the step records (:mod:`recontrast_core.steps.records`).

Each record's component source (:func:`~recontrast_core.steps.records.component_source`: a
signature from the record, a body that calls ``run_component``) is compiled here and handed
to ``kfp.dsl.component``. KFP reads a component's source with ``inspect.getsource``, so the
source is registered in :mod:`linecache` under a name of its own first, the way an
interactive shell registers its cells.
"""

from __future__ import annotations

import linecache
from typing import NamedTuple  # noqa: F401  (the generated signatures use it)

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output  # noqa: F401

from recontrast_core.steps.records import StepRecord, component_source

from .image import IMAGE


def make_component(record: StepRecord):
    """The KFP component of ``record``, on the project image (no kfp install at run time)."""
    source = component_source(record)
    filename = f"<recontrast component {record.op_name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = {"__name__": __name__, "NamedTuple": NamedTuple, "Input": Input, "Output": Output,
                 "Artifact": Artifact, "Dataset": Dataset, "Metrics": Metrics, "Model": Model}
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 - our own generated source
    return dsl.component(namespace[record.op_name], base_image=IMAGE, install_kfp_package=False)
