"""The pipeline steps: ingest -> adapt -> train -> evaluate -> register.

One module per step, one plain function each; the CLI (``recontrast train | evaluate |
adapt | pipeline``), the KFP components (``components/``) and the DVC stages
(``python -m recontrast_core.steps``) all call these same functions, with the settings
as one :class:`~recontrast_core.config.PipelineConfig` (:mod:`.settings`). Steps talk
only through files (:mod:`.artifacts`, docs/contracts.md).
"""

from .adapt import adapt, skip_adapt
from .evaluate import evaluate
from .ingest import ingest
from .register import register
from .train import train

STEPS = ("ingest", "adapt", "train", "evaluate", "register")

__all__ = ["STEPS", "ingest", "adapt", "skip_adapt", "train", "evaluate", "register"]
