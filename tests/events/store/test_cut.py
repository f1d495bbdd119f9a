"""Cuts against real PostgreSQL and Kafka: a position or a time maps to the offsets it covers."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from events.errors import NotFound, Retryable
from events.store.client import EventStore
from events.store.cut import NotReady, cut_at
from events.store.log import read_pinned
from tests.faults.helpers import sample_event

pytestmark = pytest.mark.services


def _cut(store: EventStore, **at: object):  # type: ignore[no-untyped-def]
    return cut_at(store.ledger.connection, store.settings.partitions, **at)  # type: ignore[arg-type]


def test_a_cut_bounds_exactly_the_events_at_or_below_its_position(store: EventStore) -> None:
    positions = [store.append(f"s-{i % 5}", sample_event(f"x-{i}")).positions[0] for i in range(30)]
    store.flush()
    for position in (positions[0], positions[11], positions[-1]):
        cut = _cut(store, position=position)
        seen = [int(dict(m.headers)["evp.position"]) for m in read_pinned(store.settings, store.settings.events_topic, cut.ranges)
                if cut.admits(m.headers)]
        assert sorted(seen) == [p for p in positions if p <= position]
        assert cut.position == position
    assert _cut(store).position == positions[-1]  # no point given: the ledger's end


def test_a_time_maps_to_the_last_position_recorded_by_then(store: EventStore) -> None:
    first = store.append("early", sample_event("e-1")).positions[0]
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    store.append("late", sample_event("l-1"))
    store.flush()
    cut = _cut(store, time=between)
    assert (cut.position, cut.time) == (first, between)
    assert "as of" in cut.describe() and str(first) in cut.describe()
    with pytest.raises(NotFound, match="no event recorded at or before"):
        _cut(store, time=datetime(2000, 1, 1, tzinfo=UTC))


def test_a_cut_over_unpublished_events_is_refused_as_retryable(store: EventStore) -> None:
    store.flush()
    waiting = store.append("waiting", sample_event("w-1")).positions[0]
    with pytest.raises(NotReady, match=f"first at {waiting}") as caught:
        _cut(store)
    assert isinstance(caught.value, Retryable)
    store.flush()
    assert _cut(store).position == waiting
