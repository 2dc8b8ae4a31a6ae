"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from typing import Optional


def first_line(exc: BaseException, limit: Optional[int] = 200) -> str:
    """The first line of ``exc``'s message (its type name when empty), cut to ``limit``:
    for wrapping a library's multi-line error into our one-line message."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if limit is None else line[:limit]


class UserError(Exception):
    """Bad input from the user (a file, a field, a setting). Never a bug in our code."""


class DiskFullError(UserError):
    """An output could not be written: the disk (or quota) is full. Names the file."""


class DataValidationError(UserError):
    """A dataset file fails validation. The message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WeightsUnavailableError(UserError):
    """Pretrained weights were asked for but cannot be reached (offline, missing file)."""
