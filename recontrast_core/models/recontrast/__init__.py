"""The ``recontrast`` model kind: the network (:mod:`.network`), its loss
(:mod:`recontrast_core.losses`) and its anomaly map (:mod:`.scorer`)."""

from .network import (
    Bottleneck,
    Decoder,
    FusionBottleneck,
    ReContrast,
    build_model,
    build_recontrast,
    kaiming_fan_out_init,
)
from .scorer import ReContrastScorer

__all__ = ["Bottleneck", "Decoder", "FusionBottleneck", "ReContrast", "ReContrastScorer", "build_model",
           "build_recontrast", "kaiming_fan_out_init"]
