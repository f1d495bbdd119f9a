"""Helpers for tests of cuts (time travel): a relay's re-send, and when a position was recorded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from events.store.client import EventStore


def resend(store: EventStore, positions: Sequence[int]) -> None:
    """What a relay does after a crash between Kafka's acknowledgement and clearing the outbox:
    the events go out again, after whatever the partition got since, and the ledger records
    their new offsets, so a cut at one of them ends past the later events sent in between."""
    with store.ledger.connection.transaction():
        store.ledger.connection.execute(
            "INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events"
            " WHERE position = ANY(%s)", (list(positions),))
    assert store.flush() == len(positions)


def recorded_at(store: EventStore, position: int) -> datetime:
    """When the transaction that appended ``position`` began (what a cut at a time compares)."""
    row = store.ledger.connection.execute("SELECT recorded_at FROM evp_events WHERE position = %s", (position,)).fetchone()
    assert row is not None, f"no event at ledger position {position}"
    moment: datetime = row[0]
    return moment
