"""Progress bars for long steps: tqdm on a terminal, quiet one-line summaries otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


def _interval() -> float:
    """Redraw often on a terminal; rarely in a log file, where every redraw is a new line."""
    return 0.2 if sys.stderr.isatty() else 5.0


@contextmanager
def bar(description: str, total: int | None = None, unit: str = "it") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; the bar goes to stderr so stdout stays clean for results."""
    with tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True,
              mininterval=_interval()) as meter:
        yield meter.update


@contextmanager
def step_bar(description: str, unit: str = "step") -> Iterator[Callable[[int, int], None]]:
    """Yield ``progress(done, total)`` for callers that report absolute positions (training)."""
    with tqdm(desc=description, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True,
              mininterval=_interval()) as meter:
        def progress(done: int, total: int) -> None:
            if meter.total != total:
                meter.total = total
            meter.update(done - meter.n)

        yield progress
