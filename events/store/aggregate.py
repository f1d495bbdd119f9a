"""Rehydrating aggregates from the ledger, starting from an aggregate snapshot when there is one.

A load reads the newest snapshot of the stream (if any) and only the events after it, by
index: the cost is proportional to the events since the last snapshot, not to the stream's
length or the topic's size. Snapshots are a cache: deleting them changes no result, only
the time a load takes (see :func:`load`).

A snapshot holds the folded state in plaintext JSON — personal data included, decrypted —
so it is a copy that crypto-shredding cannot reach. Erasure therefore deletes it
(:func:`drop_snapshots`, called by :func:`events.ops.forget.forget_subject`), and
:func:`save_snapshot` refuses a stream that concerns a forgotten subject, so a process
whose keyring still caches the key cannot write a new copy after the erasure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from events.errors import KeyErased
from events.privacy.keyring import KEYRING_SCHEMA
from events.store.client import EventStore, StoredEvent

State = TypeVar("State")


@dataclass(frozen=True)
class Loaded(Generic[State]):
    state: State
    version: int  #: the stream version the state reflects (0: no events)
    from_snapshot: int | None  #: the snapshot version the load started from, if any
    events_read: int


#: The key rows of every subject a stream's events concern, locked against an erasure.
_SUBJECT_KEYS = (
    f"SELECT k.subject_id, k.wrapped_key IS NULL FROM {KEYRING_SCHEMA}.evp_data_keys k WHERE k.subject_id IN ("
    " SELECT unnest(e.subject_ids) FROM evp_events e WHERE e.stream_id = %s"
    " UNION SELECT e.subject_id FROM evp_events e WHERE e.stream_id = %s AND e.subject_id IS NOT NULL)"
    " ORDER BY k.subject_id FOR SHARE OF k"
)


def save_snapshot(store: EventStore, stream_id: str, version: int, state: Mapping[str, Any]) -> None:
    """Store ``state`` as of ``version`` (JSON); a later save for the same version replaces it.

    Raises :class:`KeyErased` (nothing stored) when any subject the stream's events concern
    was forgotten. The check holds the subjects' key rows (``FOR SHARE``) until the snapshot
    is committed, so an erasure either waits for it and then deletes it, or came first and
    is seen.
    """
    conn = store.ledger.connection
    with conn.transaction():
        erased = [subject for subject, gone in conn.execute(_SUBJECT_KEYS, (stream_id, stream_id)).fetchall() if gone]
        if erased:
            raise KeyErased(erased[0])
        conn.execute(
            "INSERT INTO evp_aggregate_snapshots (stream_id, version, state) VALUES (%s, %s, %s::jsonb)"
            " ON CONFLICT (stream_id, version) DO UPDATE SET state = EXCLUDED.state, taken_at = now()",
            (stream_id, version, json.dumps(state, sort_keys=True)),
        )


def count_snapshots(store: EventStore, stream_ids: Sequence[str]) -> int:
    """How many aggregate snapshots the streams have."""
    row = store.ledger.connection.execute(
        "SELECT count(*) FROM evp_aggregate_snapshots WHERE stream_id = ANY(%s)", (list(stream_ids),)
    ).fetchone()
    return int(row[0]) if row else 0


def drop_snapshots(store: EventStore, stream_ids: Sequence[str]) -> int:
    """Delete every aggregate snapshot of the streams (an erasure); returns how many.

    Loads then start from the events, whose personal fields read as erased.
    """
    return store.ledger.connection.execute(
        "DELETE FROM evp_aggregate_snapshots WHERE stream_id = ANY(%s)", (list(stream_ids),)
    ).rowcount


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
