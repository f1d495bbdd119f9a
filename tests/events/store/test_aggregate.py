"""Aggregate loads start from the newest snapshot and read only the events after it.

Snapshots hold decrypted state, so forgetting a subject deletes the snapshots of every
stream that concerns them, and no snapshot of such a stream can be saved afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import random

import psycopg
import pytest

from events.errors import KeyErased
from events.ops.forget import erasure_scope, forget_subject
from events.privacy.personal import REDACTED
from events.settings import Settings
from events.store.aggregate import load, save_snapshot
from events.store.client import EventStore, StoredEvent
from events.event import Event
from tests.support.plaintext import make_people, register

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


def profile(state: dict[str, Any], event: StoredEvent) -> dict[str, Any]:
    return {"name": event.data["name"], "email": event.data["email"]}


def no_profile() -> dict[str, Any]:
    return {"name": None, "email": None}


def test_forgetting_a_subject_drops_the_snapshots_of_their_streams(store: EventStore, settings: Settings) -> None:
    gone, kept = make_people(random.Random(), 2)
    for person in (gone, kept):
        register(store, person)
        loaded = load(store, person.stream_id, no_profile, profile)
        assert loaded.state == {"name": person.name, "email": person.email}
        save_snapshot(store, person.stream_id, loaded.version, loaded.state)  # plaintext JSON: a copy
    assert erasure_scope(store, gone.annotator_id).aggregate_snapshots == 1

    report = forget_subject(store, gone.annotator_id, reason="request")

    assert report.aggregate_snapshots == 1 and "1 aggregate snapshots" in str(report)
    with psycopg.connect(settings.database_url) as conn:
        left = conn.execute("SELECT stream_id, state::text FROM evp_aggregate_snapshots").fetchall()
    assert [row[0] for row in left] == [kept.stream_id]  # the other person's snapshot stays
    assert not any(gone.email in row[1] or gone.name in row[1] for row in left)
    after = load(store, gone.stream_id, no_profile, profile, from_json=restore)
    assert after.from_snapshot is None and after.state == {"name": REDACTED, "email": REDACTED}
    assert load(store, kept.stream_id, no_profile, profile, from_json=restore).from_snapshot == 1


def test_no_snapshot_of_a_forgotten_subjects_stream_can_be_saved(store: EventStore) -> None:
    (gone,) = make_people(random.Random(), 1)
    register(store, gone)
    stale = load(store, gone.stream_id, no_profile, profile).state  # e.g. decrypted with a key still cached
    forget_subject(store, gone.annotator_id, reason="request")

    with pytest.raises(KeyErased, match=gone.annotator_id):
        save_snapshot(store, gone.stream_id, 1, stale)
    row = store.ledger.connection.execute(
        "SELECT count(*) FROM evp_aggregate_snapshots WHERE stream_id = %s", (gone.stream_id,)
    ).fetchone()
    assert row == (0,)
