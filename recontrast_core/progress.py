"""One progress-bar style for every long loop (training, evaluation, caching, adaptation).

Library functions take ``progress: bool`` and call :func:`track_steps`; the bars draw on
stderr so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Optional[Progress], task):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, info=info)

    def grow(self, n: int) -> None:
        """Raise the total by ``n`` (a stream whose length is learnt page by page)."""
        if self._progress is not None:
            task = next(t for t in self._progress.tasks if t.id == self._task)
            self._progress.update(self._task, total=(task.total or 0) + n)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console,
    )


def open_bar(description: str, total: int, completed: int = 0) -> tuple[_Bar, Callable[[], None]]:
    """A started bar and its ``close`` (for loops that cannot sit in a ``with`` block)."""
    progress = _progress()
    progress.start()
    task = progress.add_task(description, total=total, completed=completed, info="")
    return _Bar(progress, task), progress.stop


@contextlib.contextmanager
def track_steps(description: str, total: int, enabled: bool = True, completed: int = 0) -> Iterator[_Bar]:
    """``with track_steps("train", 2000) as bar: ... bar.advance(1, info="loss 0.42")``."""
    if not enabled:
        yield _Bar(None, None)
        return
    progress = _progress()
    with progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task)
