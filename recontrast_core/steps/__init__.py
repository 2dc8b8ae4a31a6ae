"""The pipeline steps: ingest -> adapt -> train -> evaluate -> register (+ the KFP-only
``train_job``, ``batch_score``, ``recalibrate`` and ``monitor``).

One module per step: a plain function and its record (:mod:`.records`: inputs, outputs,
the settings sections it reads, the CLI and KFP adapters). The CLI (``recontrast train |
evaluate | adapt | pipeline``), the KFP components (``components/``, generated from the
records) and the DVC stages (``python -m recontrast_core.steps``, ``dvc.yaml`` generated
from the records) all call these same functions, with the settings as one
:class:`~recontrast_core.config.PipelineConfig` (:mod:`.settings`). Steps talk only
through files (:mod:`.artifacts`, docs/contracts.md).

The imports below register the records; their order is the DVC stage order.
"""

from .ingest import ingest
from .adapt import adapt, skip_adapt
from .train import train
from .train_job import run_train_job
from .evaluate import evaluate
from .register import register
from .batch_score import run_batch_scoring
from .recalibrate import recalibrate
from .monitor import RECORD as _MONITOR  # noqa: F401  (the KFP-only monitor step)
from .records import dvc_steps, get_step, run_component, step_records

STEPS = dvc_steps()  # the DVC stages: ("ingest", "adapt", "train", "evaluate", "register")

__all__ = ["STEPS", "ingest", "adapt", "skip_adapt", "train", "evaluate", "register", "run_train_job",
           "run_batch_scoring", "recalibrate", "get_step", "run_component", "step_records"]
