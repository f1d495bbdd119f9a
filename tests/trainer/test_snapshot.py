"""Snapshots pin offsets and a content hash; re-reading Kafka and the shards must agree."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from events.errors import IntegrityError, NotFound
from events.event import Event
from events.store.client import EventStore
from tests.support.examples import DIGITS, project
from trainer.dataset import content_hash
from trainer.snapshot import (
    MANIFEST, check_shards, create_snapshot, load_dataset, load_manifest, load_table, snapshot_dir, verify_snapshot,
)

pytestmark = pytest.mark.services

PROJECT = project(DIGITS)
DATASET = load_dataset(PROJECT, "digits")


def submit(store: EventStore, i: int, label: int) -> None:
    features = [float((i * 7 + k) % 17) for k in range(64)]
    store.append(f"sample-{i}", Event("SampleSubmitted", {"sample_id": f"s{i:03d}", "annotator_id": "a1",
                                                           "features": features, "label": label}, actor="a1"))


def fill(store: EventStore, count: int = 30) -> None:
    for i in range(count):
        submit(store, i, i % 10)
    store.append("sample-3", Event("LabelCorrected", {"sample_id": "s003", "annotator_id": "a2",
                                                      "previous_label": 3, "label": 8}))
    store.append("sample-4", Event("SampleRetracted", {"sample_id": "s004", "annotator_id": "a1", "reason": "blur"}))


def test_a_snapshot_records_the_dataset_and_applies_its_fold(store: EventStore) -> None:
    fill(store)
    manifest = create_snapshot(store, DATASET)
    table = load_table(store, manifest.snapshot_id)
    assert manifest.row_count == 29 == len(table)
    assert "s004" not in table.row_ids and list(table.row_ids) == sorted(table.row_ids)
    assert int(table["label"][table.row_ids.index("s003")]) == 8
    assert manifest.record_count == 32 and sum(end for _, end in manifest.ranges.values()) == 32
    recorded = load_manifest(store, manifest.snapshot_id)
    assert recorded == manifest
    assert (recorded.dataset, recorded.dataset_version, recorded.declaration) == ("digits", 1, "digits.datasets:Digits")
    assert [c.describe() for c in recorded.columns] == [{"name": "features", "dtype": "float32", "shape": [64]},
                                                        {"name": "label", "dtype": "int64", "shape": []}]
    event = store.read_stream(f"snapshot-{manifest.snapshot_id}")[0]
    assert event.record.actor == store.settings.actor
    assert content_hash(DATASET.identity(), table) == manifest.content_hash


def test_verify_ignores_events_after_the_pinned_offsets(store: EventStore) -> None:
    fill(store)
    manifest = create_snapshot(store, DATASET)
    for i in range(100, 110):
        submit(store, i, 1)
    store.flush()
    result = verify_snapshot(store, manifest.snapshot_id, PROJECT)
    assert result.content_hash == manifest.content_hash
    assert result.shards_checked == len(manifest.shards)


def test_a_missing_shard_fails_verify_and_rematerializes_byte_identical(store: EventStore) -> None:
    fill(store)
    manifest = create_snapshot(store, DATASET)
    folder = snapshot_dir(store, manifest.snapshot_id)
    before = {s.name: (folder / s.name).read_bytes() for s in manifest.shards}
    (folder / manifest.shards[0].name).unlink()
    with pytest.raises(IntegrityError, match=f"{manifest.shards[0].name} is missing"):
        verify_snapshot(store, manifest.snapshot_id, PROJECT)
    with pytest.raises(IntegrityError, match="is missing"):
        load_table(store, manifest.snapshot_id)  # without the project: no re-materializing
    table = load_table(store, manifest.snapshot_id, PROJECT)  # re-reads Kafka
    assert {s.name: (folder / s.name).read_bytes() for s in manifest.shards} == before
    assert content_hash(DATASET.identity(), table) == manifest.content_hash


def test_an_altered_shard_fails_verify_and_the_offline_check(store: EventStore) -> None:
    fill(store)
    manifest = create_snapshot(store, DATASET)
    folder = snapshot_dir(store, manifest.snapshot_id)
    assert len(check_shards(folder)) == manifest.row_count  # from manifest.json alone, no Kafka
    assert (folder / MANIFEST).is_file()
    path = folder / manifest.shards[0].name
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    for check in (lambda: verify_snapshot(store, manifest.snapshot_id, PROJECT), lambda: check_shards(folder),
                  lambda: load_table(store, manifest.snapshot_id, PROJECT)):
        with pytest.raises(IntegrityError, match="sha256"):
            check()


def test_relay_duplicates_do_not_change_the_snapshot(store: EventStore) -> None:
    fill(store)
    store.flush()
    first = create_snapshot(store, DATASET)
    # Simulate a relay that crashed after Kafka acknowledged but before it cleared the outbox.
    with store.ledger.connection.transaction():
        store.ledger.connection.execute(
            "INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events"
            " WHERE event_type LIKE 'digits.%'"
        )
    assert store.flush() == 32
    second = create_snapshot(store, DATASET)
    assert second.record_count == first.record_count + 1  # + the first SnapshotCreated
    assert second.content_hash == first.content_hash


def test_unknown_snapshot_is_named(store: EventStore) -> None:
    with pytest.raises(NotFound, match="snap-nope"):
        load_table(store, "snap-nope")


def test_a_changed_dataset_version_is_refused_on_verify(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(store, 5)
    manifest = create_snapshot(store, DATASET)
    monkeypatch.setattr(type(DATASET), "version", 2)
    with pytest.raises(IntegrityError, match="cut by dataset 'digits' version 1; digits.datasets:Digits is now "
                                             "'digits' version 2"):
        verify_snapshot(store, manifest.snapshot_id, PROJECT)


# One store for all examples: each example writes to its own streams (a fresh tag), and the
# snapshot's content is compared for the rows of that tag only.
_OPS = st.lists(st.tuples(st.sampled_from(["submit", "correct", "retract"]), st.integers(0, 5), st.integers(0, 9)),
                min_size=1, max_size=25)


@hsettings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_a_snapshot_is_the_fold_of_any_history_and_verifies(store: EventStore, ops: list[tuple[str, int, int]]) -> None:
    tag = uuid.uuid4().hex[:8]
    expected: dict[str, tuple[float, int]] = {}
    versions: dict[str, int] = {}
    for op, n, label in ops:
        sample, stream = f"{tag}-{n}", f"sample-{tag}-{n}"
        if op == "submit":
            event = Event("SampleSubmitted", {"sample_id": sample, "annotator_id": "a1",
                                              "features": [float(n + label)] * 64, "label": label})
            expected[sample] = (float(n + label), label)
        elif op == "correct":
            event = Event("LabelCorrected", {"sample_id": sample, "annotator_id": "a2", "previous_label": 0,
                                             "label": label})
            if sample in expected:
                expected[sample] = (expected[sample][0], label)
        else:
            event = Event("SampleRetracted", {"sample_id": sample, "annotator_id": "a1", "reason": "r"})
            expected.pop(sample, None)
        versions[stream] = store.append(stream, event, versions.get(stream, 0)).last_version
    manifest = create_snapshot(store, DATASET)
    table = load_table(store, manifest.snapshot_id)
    mine = {i: (float(table["features"][r, 0]), int(table["label"][r]))
            for r, i in enumerate(table.row_ids) if i.startswith(tag)}
    assert mine == expected
    assert np.all(table["features"] == table["features"][:, :1])
    assert verify_snapshot(store, manifest.snapshot_id, PROJECT).content_hash == manifest.content_hash
