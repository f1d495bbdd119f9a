"""Aggregate loads start from the newest snapshot and read only the events after it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from events.store.aggregate import load, save_snapshot
from events.store.client import EventStore, StoredEvent
from events.event import Event

pytestmark = pytest.mark.services


def relabel(state: dict[str, Any], event: StoredEvent) -> dict[str, Any]:
    return {"label": event.data["label"], "changes": state["changes"] + 1}


def initial() -> dict[str, Any]:
    return {"label": None, "changes": 0}


def restore(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    return dict(snapshot)


def correct(store: EventStore, label: int) -> None:
    store.append("sample-x", Event("LabelCorrected", {"sample_id": "x", "annotator_id": "a", "previous_label": 0,
                                                      "label": label}))


def test_a_load_from_a_snapshot_equals_a_full_replay_and_reads_less(store: EventStore) -> None:
    for label in range(10):
        correct(store, label)
    full = load(store, "sample-x", initial, relabel)
    assert (full.state, full.version, full.events_read, full.from_snapshot) == ({"label": 9, "changes": 10}, 10, 10, None)

    save_snapshot(store, "sample-x", full.version, full.state)
    for label in (4, 2):
        correct(store, label)
    fast = load(store, "sample-x", initial, relabel, from_json=restore)
    slow = load(store, "sample-x", initial, relabel)
    assert fast.state == slow.state == {"label": 2, "changes": 12}
    assert (fast.version, fast.from_snapshot, fast.events_read) == (12, 10, 2)
    assert slow.events_read == 12


def test_an_unknown_stream_loads_as_the_initial_state(store: EventStore) -> None:
    loaded = load(store, "sample-none", initial, relabel, from_json=restore)
    assert (loaded.state, loaded.version, loaded.events_read) == (initial(), 0, 0)
