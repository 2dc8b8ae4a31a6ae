"""The networks: backbone encoders (:mod:`.backbones`) and ReContrast (:mod:`.recontrast`)."""

from .recontrast import build_model

__all__ = ["build_model"]
