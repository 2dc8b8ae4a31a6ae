"""One progress-bar style for every long loop (training, evaluation, caching, adaptation).

Library functions take ``progress: bool`` and call :func:`track_steps`; the bars draw on
stderr so ``--json`` output on stdout stays clean. The bars are tqdm's: the core imports no
CLI library (rich and typer belong to :mod:`recontrast_core.cli`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Optional

from tqdm.auto import tqdm


class _Bar:
    def __init__(self, bar: Optional[tqdm]):
        self._bar = bar

    def advance(self, n: int = 1, info: str = "") -> None:
        if self._bar is not None:
            if info:
                self._bar.set_postfix_str(info, refresh=False)
            self._bar.update(n)

    def grow(self, n: int) -> None:
        """Raise the total by ``n`` (a stream whose length is learnt page by page)."""
        if self._bar is not None:
            self._bar.total = (self._bar.total or 0) + n
            self._bar.refresh()


def _tqdm(description: str, total: int, completed: int) -> tqdm:
    return tqdm(total=total, initial=completed, desc=description, file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix} "
                           "[{elapsed}<{remaining}]")


def open_bar(description: str, total: int, completed: int = 0) -> tuple[_Bar, Callable[[], None]]:
    """A started bar and its ``close`` (for loops that cannot sit in a ``with`` block)."""
    bar = _tqdm(description, total, completed)
    return _Bar(bar), bar.close


@contextlib.contextmanager
def track_steps(description: str, total: int, enabled: bool = True, completed: int = 0) -> Iterator[_Bar]:
    """``with track_steps("train", 2000) as bar: ... bar.advance(1, info="loss 0.42")``."""
    if not enabled:
        yield _Bar(None)
        return
    bar = _tqdm(description, total, completed)
    try:
        yield _Bar(bar)
    finally:
        bar.close()
