"""A saved ``manifest.json`` read back as it is (:func:`read_dataset` only; options are ignored)."""

from __future__ import annotations

from typing import Optional

from ..manifest import Manifest
from .common import PathLike
from .registry import Layout, register_layout


def _read(path: Optional[PathLike], options: dict) -> Manifest:
    return Manifest.load(path)


register_layout(Layout(
    "manifest", "a saved manifest.json file", _read,
    detect=lambda p: p.is_file() and p.suffix.lower() == ".json", priority=0,
    listed_as="a manifest.json file",
))
