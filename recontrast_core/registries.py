"""One shape for every extension point: a registry of named records (model kinds, data
layouts, adaptation methods, pipeline steps). Modeled on timm's ``register_model`` /
``create_model``: a record registers itself when its module is imported; a lookup of an
unknown name is a :class:`~recontrast_core.errors.UserError` that lists the known ones."""

from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """``name -> record`` (a dict, in registration order). ``what`` names the kind of record in
    messages; ``unknown(name)`` may replace the default unknown-name message."""

    def __init__(self, what: str, unknown: Optional[Callable[[str], str]] = None):
        super().__init__()
        self.what, self._unknown = what, unknown

    def add(self, record: T) -> T:
        """Register ``record`` under ``record.name``; a name registered twice is an error."""
        name = record.name  # type: ignore[attr-defined]
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = record
        return record

    def lookup(self, name) -> T:
        try:
            return self[name]
        except KeyError:
            msg = self._unknown(name) if self._unknown else f"unknown {self.what} {name!r}; known: {', '.join(self)}"
            raise UserError(msg) from None


__all__ = ["Registry"]
