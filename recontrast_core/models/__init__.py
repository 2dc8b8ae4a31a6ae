"""The model kinds, one folder each (:mod:`.recontrast`, :mod:`.patchknn`, :mod:`.fused`),
the backbone encoders they share (:mod:`.backbones`) and the registry of kinds (:mod:`.kinds`)."""

from .recontrast import build_model

__all__ = ["build_model"]
