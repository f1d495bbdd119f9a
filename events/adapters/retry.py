"""The one retry policy: exponential backoff on retryable failures, and only on those.

What is retryable is decided by class, once: :class:`events.errors.Retryable` (which
:class:`~events.errors.ServiceUnavailable` is) and the drivers' connection errors that
escape an adapter (a PostgreSQL server restarting under an open connection). Anything
else is a verdict (a bad record, a wrong setting, an integrity failure) and propagates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from events.errors import Retryable

#: The failures a retry can cure.
RETRYABLE: tuple[type[BaseException], ...] = (Retryable, psycopg.OperationalError, psycopg.InterfaceError)


@dataclass
class Backoff:
    """Delays of ``initial * factor**n`` seconds, capped at ``ceiling``; :meth:`reset` after a success."""

    initial: float = 0.2
    factor: float = 2.0
    ceiling: float = 5.0

    def __post_init__(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * self.factor, self.ceiling)
        return delay

    def reset(self) -> None:
        self._next = self.initial


def run_until_stopped(
    stop: threading.Event,
    step: Callable[[], None],
    *,
    recover: Callable[[], None],
    log: logging.Logger,
    name: str,
    backoff: Backoff | None = None,
) -> None:
    """Call ``step`` until ``stop`` is set, surviving retryable failures.

    1. ``step`` does one unit of work (it may wait for work itself);
    2. on a :data:`RETRYABLE` failure: log it naming ``name``, call ``recover`` (drop the
       broken connections), wait the next backoff delay (or until ``stop``), go on;
    3. any other exception propagates: the caller's process should stop and say why;
    4. after a step that succeeds the backoff starts again from its initial delay.
    """
    delays = backoff or Backoff()
    while not stop.is_set():
        try:
            step()
        except RETRYABLE as err:
            delay = delays.next()
            log.warning("%s: %s; retrying in %.1fs", name, err, delay)
            recover()
            stop.wait(delay)
            continue
        delays.reset()
