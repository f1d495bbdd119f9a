"""Named fault points: where a fault test makes a process die on purpose, in the exact window a promise is about.

Killing a process at a random moment mostly hits it idle; the dangerous windows are narrow.
A process started with ``EVP_FAULT_POINT=NAME`` (or ``NAME@N``) dies in the window ``NAME``
names. Contract of :func:`reach`:

1. unset (every production process), it returns at once: the variable is read once, at
   import, and costs one comparison per call afterwards;
2. armed, the ``N``-th time (default the first) the process reaches ``NAME`` it appends one
   JSON line of evidence to the file ``EVP_FAULT_EVIDENCE`` (the point, the pid, the hit
   count and what the caller passed: the batch's positions, the backend's state ...),
   fsyncs it, and SIGKILLs itself, so nothing after the point runs: no ``finally``, no
   ``atexit``, exactly as a power cut or the OOM killer would leave it.

The points evp's code reaches (the tests assert each one's evidence):

- ``relay.acknowledged``: Kafka acknowledged a batch; its outbox rows are not yet cleared,
  so the next relay sends it again (consumers must drop the duplicates);
- ``view.committed``: a view's batch and its offsets committed; the next poll has not run.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

POINT_VARIABLE = "EVP_FAULT_POINT"
EVIDENCE_VARIABLE = "EVP_FAULT_EVIDENCE"

RELAY_ACKNOWLEDGED = "relay.acknowledged"
VIEW_COMMITTED = "view.committed"


def _armed() -> tuple[str, int] | None:
    raw = os.environ.get(POINT_VARIABLE, "").strip()
    if not raw:
        return None
    name, _, nth = raw.partition("@")
    return name, int(nth) if nth else 1


_ARMED = _armed()
_hits = 0


def reach(point: str, **detail: Any) -> None:
    """Steps 1 and 2 of the module docstring."""
    global _hits
    if _ARMED is None or _ARMED[0] != point:
        return
    _hits += 1
    if _hits < _ARMED[1]:
        return
    path = os.environ.get(EVIDENCE_VARIABLE)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"point": point, "pid": os.getpid(), "hit": _hits, **detail}, default=str) + "\n")
            out.flush()
            os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
