"""Rehydrating aggregates from the ledger, starting from an aggregate snapshot when there is one.

A load reads the newest snapshot of the stream (if any) and only the events after it, by
index: the cost is proportional to the events since the last snapshot, not to the stream's
length or the topic's size. Snapshots are a cache: deleting them changes no result, only
the time a load takes (see :func:`load`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from events.store.client import EventStore, StoredEvent

State = TypeVar("State")


@dataclass(frozen=True)
class Loaded(Generic[State]):
    state: State
    version: int  #: the stream version the state reflects (0: no events)
    from_snapshot: int | None  #: the snapshot version the load started from, if any
    events_read: int


def save_snapshot(store: EventStore, stream_id: str, version: int, state: Mapping[str, Any]) -> None:
    """Store ``state`` as of ``version`` (JSON); a later save for the same version replaces it."""
    store.ledger.connection.execute(
        "INSERT INTO evp_aggregate_snapshots (stream_id, version, state) VALUES (%s, %s, %s::jsonb)"
        " ON CONFLICT (stream_id, version) DO UPDATE SET state = EXCLUDED.state, taken_at = now()",
        (stream_id, version, json.dumps(state, sort_keys=True)),
    )


def load(
    store: EventStore,
    stream_id: str,
    initial: Callable[[], State],
    apply: Callable[[State, StoredEvent], State],
    *,
    from_json: Callable[[Mapping[str, Any]], State] | None = None,
) -> Loaded[State]:
    """Fold a stream into its current state: newest snapshot (when ``from_json`` is given) + later events."""
    row = None
    if from_json is not None:
        row = store.ledger.connection.execute(
            "SELECT version, state FROM evp_aggregate_snapshots WHERE stream_id = %s ORDER BY version DESC LIMIT 1",
            (stream_id,),
        ).fetchone()
    state, start = (from_json(row[1]), int(row[0])) if row and from_json else (initial(), 0)
    version, count = start, 0
    for record in store.ledger.read_stream_after(stream_id, start):
        state = apply(state, store.decode(record))
        version, count = record.version, count + 1
    return Loaded(state, version, start if row else None, count)
