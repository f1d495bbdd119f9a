"""Snapshots pin offsets and a content hash; re-materializing from Kafka must agree."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from events.store.client import EventStore
from events.errors import IntegrityError, NotFound
from events.event import Event
from trainer.snapshot import content_hash, create_snapshot, load_examples, snapshot_dir, verify_snapshot

pytestmark = pytest.mark.services


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


def test_snapshot_applies_corrections_and_retractions(store: EventStore) -> None:
    fill(store)
    manifest = create_snapshot(store)
    examples = load_examples(store, manifest.snapshot_id)
    assert manifest.sample_count == 29 == len(examples)
    assert "s004" not in examples.sample_ids
    assert int(examples.labels[examples.sample_ids.index("s003")]) == 8
    assert list(examples.sample_ids) == sorted(examples.sample_ids)
    assert manifest.record_count == 32
    assert sum(end for _, end in manifest.ranges.values()) == 32


def test_verify_ignores_events_after_the_pinned_offsets(store: EventStore) -> None:
    fill(store)
    manifest = create_snapshot(store)
    for i in range(100, 110):
        submit(store, i, 1)
    store.flush()
    result = verify_snapshot(store, manifest.snapshot_id)
    assert result.content_hash == manifest.content_hash
    assert result.shards_checked == len(manifest.shards)


def test_rematerialized_shards_are_byte_identical(store: EventStore) -> None:
    fill(store)
    manifest = create_snapshot(store)
    folder = snapshot_dir(store, manifest.snapshot_id)
    before = {s.name: (folder / s.name).read_bytes() for s in manifest.shards}
    for shard in manifest.shards:
        (folder / shard.name).unlink()
    examples = load_examples(store, manifest.snapshot_id)  # re-reads Kafka
    assert {s.name: (folder / s.name).read_bytes() for s in manifest.shards} == before
    assert content_hash(examples) == manifest.content_hash


def test_relay_duplicates_do_not_change_the_snapshot(store: EventStore) -> None:
    fill(store)
    store.flush()
    first = create_snapshot(store)
    # Simulate a relay that crashed after Kafka acknowledged but before it cleared the outbox.
    with store.ledger.connection.transaction():
        store.ledger.connection.execute(
            "INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events"
            " WHERE event_type LIKE 'evp.samples.%'"
        )
    assert store.flush() == 32
    second = create_snapshot(store)
    assert second.record_count == first.record_count + 1  # + the first SnapshotCreated
    assert second.content_hash == first.content_hash


def test_tampered_shard_is_refused(store: EventStore) -> None:
    fill(store)
    manifest = create_snapshot(store)
    path = snapshot_dir(store, manifest.snapshot_id) / manifest.shards[0].name
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="sha256"):
        load_examples(store, manifest.snapshot_id)


def test_unknown_snapshot_is_named(store: EventStore) -> None:
    with pytest.raises(NotFound, match="snap-nope"):
        load_examples(store, "snap-nope")


def test_content_hash_depends_on_every_row(store: EventStore) -> None:
    fill(store, 12)
    manifest = create_snapshot(store)
    examples = load_examples(store, manifest.snapshot_id)
    changed = examples.features.copy()
    changed[5, 10] += np.float32(1)
    from trainer.data import Examples

    assert content_hash(Examples(examples.sample_ids, changed, examples.labels)) != manifest.content_hash


# One store for all examples: each example writes to its own streams (a fresh tag), and the
# snapshot's content is compared for the samples of that tag only.
_OPS = st.lists(st.tuples(st.sampled_from(["submit", "correct", "retract"]), st.integers(0, 5), st.integers(0, 9)),
                min_size=1, max_size=25)


@hsettings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_a_snapshot_is_the_fold_of_any_history_and_rematerializes_to_the_same_hash(
    store: EventStore, ops: list[tuple[str, int, int]]
) -> None:
    tag = uuid.uuid4().hex[:8]
    expected: dict[str, int] = {}
    versions: dict[str, int] = {}
    for op, n, label in ops:
        sample, stream = f"{tag}-{n}", f"sample-{tag}-{n}"
        if op == "submit":
            event = Event("SampleSubmitted", {"sample_id": sample, "annotator_id": "a1", "features": [float(n)] * 64,
                                              "label": label})
            expected[sample] = label
        elif op == "correct":
            event = Event("LabelCorrected", {"sample_id": sample, "annotator_id": "a2", "previous_label": 0,
                                             "label": label})
            if sample in expected:
                expected[sample] = label
        else:
            event = Event("SampleRetracted", {"sample_id": sample, "annotator_id": "a1", "reason": "r"})
            expected.pop(sample, None)
        versions[stream] = store.append(stream, event, versions.get(stream, 0)).last_version
    manifest = create_snapshot(store)
    examples = load_examples(store, manifest.snapshot_id)
    mine = {i: int(label) for i, label in zip(examples.sample_ids, examples.labels) if i.startswith(tag)}
    assert mine == expected
    for shard in manifest.shards:
        (snapshot_dir(store, manifest.snapshot_id) / shard.name).unlink()
    assert content_hash(load_examples(store, manifest.snapshot_id)) == manifest.content_hash
