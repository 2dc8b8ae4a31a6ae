"""The ``recontrast`` command (typer + rich): the top layer; it may import everything."""

from .app import app, main

__all__ = ["app", "main"]
