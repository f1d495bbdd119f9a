"""Snapshots pin offsets and a content hash; re-reading Kafka and the shards must agree."""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from events.errors import IntegrityError, NotFound
from events.event import Event
from events.store.client import EventStore
from events.settings import Settings
from tests.support.cli import evp
from tests.support.examples import DIGITS, project
from trainer import snapshot as snapshot_module
from trainer.dataset import content_hash
from trainer.shards import write_shards
from trainer.snapshot import (
    MANIFEST, SnapshotManifest, check_shards, create_snapshot, load_dataset, load_manifest, load_table, snapshot_dir,
    verify_snapshot,
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


# -- tampering: each is a failure that names the snapshot, what differs and where ----------------
Change = Callable[[dict[str, Any]], None]


@pytest.fixture
def cut(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> SnapshotManifest:
    """A snapshot of 29 rows in four shards (8 rows each), cut through the commands' own code."""
    monkeypatch.setattr(snapshot_module, "write_shards", functools.partial(write_shards, rows_per_shard=8))
    fill(store)
    manifest = create_snapshot(store, DATASET)
    assert len(manifest.shards) == 4
    return manifest


def change_local_copy(store: EventStore, snapshot_id: str, change: Change) -> None:
    """Edit the manifest.json beside the shards."""
    path = snapshot_dir(store, snapshot_id) / MANIFEST
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def change_record(store: EventStore, snapshot_id: str, change: Change) -> None:
    """Edit the SnapshotCreated event in the ledger (re-encoded with its own schema): the log's record."""
    [event] = store.read_stream(f"snapshot-{snapshot_id}", decrypt=False)
    data = dict(event.data)
    change(data)
    value = store.codec.encode(event.record.event_type, data).value
    store.ledger.connection.execute("UPDATE evp_events SET value = %s WHERE event_id = %s",
                                    (value, event.record.event_id))


def set_content_hash(value: str) -> Change:
    return lambda data: data.update(content_hash=value)


def move_end(partition: int, end: int) -> Change:
    def change(data: dict[str, Any]) -> None:
        data["ranges"] = [{**r, "end": end} if r["partition"] == partition else r for r in data["ranges"]]
    return change


def verify_fails(settings: Settings, snapshot_id: str) -> str:
    """`evp snapshot verify` exits 1; the error it printed on stderr (after the progress bar)."""
    outcome = evp(settings, "snapshot", "verify", snapshot_id)
    assert outcome.code == 1 and "verified" not in outcome.out, outcome
    heading = f"evp: error: snapshot {snapshot_id} does not verify:\n"
    assert heading in outcome.err, outcome.err
    return outcome.err[outcome.err.index(heading):]


def test_a_clean_snapshot_verifies_through_the_command(store: EventStore, settings: Settings,
                                                       cut: SnapshotManifest) -> None:
    outcome = evp(settings, "snapshot", "verify", cut.snapshot_id)
    assert outcome.code == 0, outcome
    assert outcome.out.startswith(f"snapshot {cut.snapshot_id}: verified (32 records re-read, 4 shards checked, "
                                  f"content hash {cut.content_hash})")
    assert len(check_shards(snapshot_dir(store, cut.snapshot_id))) == 29


def test_a_changed_content_hash_in_the_local_copy_fails_both_checks(store: EventStore, settings: Settings,
                                                                    cut: SnapshotManifest) -> None:
    forged = "0" * 64
    change_local_copy(store, cut.snapshot_id, set_content_hash(forged))
    with pytest.raises(IntegrityError) as offline:  # the offline check trusts the copy: the shards disagree
        check_shards(snapshot_dir(store, cut.snapshot_id))
    assert str(offline.value) == (f"snapshot {cut.snapshot_id}: the shards' rows hash to content hash "
                                  f"{cut.content_hash}, the snapshot recorded {forged}")
    err = verify_fails(settings, cut.snapshot_id)  # verify reads the log's record, and names the copy's difference
    assert err.count("\n- ") == 1, err
    assert (f"- snapshot {cut.snapshot_id}: manifest.json holds content_hash = \"{forged}\", the SnapshotCreated "
            f"event in the log records \"{cut.content_hash}\" (the log is the record)") in err


def test_a_changed_content_hash_in_the_log_fails_verify_and_names_the_copy_that_disagrees(
        store: EventStore, settings: Settings, cut: SnapshotManifest) -> None:
    forged = "f" * 64
    change_record(store, cut.snapshot_id, set_content_hash(forged))
    assert load_manifest(store, cut.snapshot_id).content_hash == forged
    err = verify_fails(settings, cut.snapshot_id)
    lines = err.splitlines()[1:]
    assert lines == [
        f"- snapshot {cut.snapshot_id}: re-reading Kafka gives content hash {cut.content_hash[:16]}…, recorded "
        f"{forged[:16]}…",
        f"- snapshot {cut.snapshot_id}: the shards' rows hash to content hash {cut.content_hash}, the snapshot "
        f"recorded {forged}",
        f"- snapshot {cut.snapshot_id}: manifest.json holds content_hash = \"{cut.content_hash}\", the "
        f"SnapshotCreated event in the log records \"{forged}\" (the log is the record)",
    ], err


def test_a_pinned_range_moved_over_records_the_dataset_skips_is_named_by_its_count(
        store: EventStore, settings: Settings, cut: SnapshotManifest) -> None:
    """The next record after the pinned end is the SnapshotCreated itself: folding it changes no row,
    so the content hash agrees; the record count and the schema ids do not."""
    record = store.read_stream(f"snapshot-{cut.snapshot_id}", decrypt=False)[0].record
    assert record.offset == cut.ranges[record.partition][1]
    moved = move_end(record.partition, record.offset + 1)
    change_record(store, cut.snapshot_id, moved)
    change_local_copy(store, cut.snapshot_id, moved)  # both copies changed alike
    err = verify_fails(settings, cut.snapshot_id)
    ranges = ", ".join(f"{p}:[0, {e + (p == record.partition)})" for p, (_, e) in sorted(cut.ranges.items()))
    assert err.splitlines()[1:] == [
        f"- snapshot {cut.snapshot_id}: re-reading the pinned ranges {ranges} gives record count 33, the snapshot "
        "recorded 32",
        f"- snapshot {cut.snapshot_id}: re-reading the pinned ranges {ranges} gives schema ids "
        f"{sorted({*cut.schema_ids, record.schema_id})}, the snapshot recorded {list(cut.schema_ids)}",
    ], err


def test_a_pinned_range_past_the_topics_end_is_named_without_waiting_for_records(
        store: EventStore, settings: Settings, cut: SnapshotManifest) -> None:
    partition, (_, end) = max(cut.ranges.items(), key=lambda item: item[1][1])
    change_record(store, cut.snapshot_id, move_end(partition, end + 100))
    err = verify_fails(settings, cut.snapshot_id)
    found = store.read_stream(f"snapshot-{cut.snapshot_id}", decrypt=False)[0].record
    topic_end = end + (found.partition == partition)  # the SnapshotCreated record may sit past the pinned end
    assert (f"- snapshot {cut.snapshot_id} pins partition {partition} offsets [0, {end + 100}), but the partition "
            f"ends at offset {topic_end}: records the snapshot was cut from are gone from the topic, or the pinned "
            "range was changed") in err
    index = sorted(cut.ranges).index(partition)
    assert (f"manifest.json holds ranges[{index}].end = {end}, the SnapshotCreated event in the log records "
            f"{end + 100}") in err


def test_a_deleted_shard_is_named_and_the_others_still_checked(store: EventStore, settings: Settings,
                                                              cut: SnapshotManifest) -> None:
    folder = snapshot_dir(store, cut.snapshot_id)
    (folder / cut.shards[1].name).unlink()
    err = verify_fails(settings, cut.snapshot_id)
    assert err.splitlines()[1:] == [f"- snapshot {cut.snapshot_id}: shard shard-00001.bin is missing from {folder}"]
    with pytest.raises(IntegrityError, match=f"^snapshot {cut.snapshot_id}: shard shard-00001.bin is missing"):
        check_shards(folder)


def test_a_changed_shard_is_named_with_both_hashes(store: EventStore, settings: Settings,
                                                   cut: SnapshotManifest) -> None:
    folder = snapshot_dir(store, cut.snapshot_id)
    path = folder / cut.shards[2].name
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    err = verify_fails(settings, cut.snapshot_id)
    found = hashlib.sha256(bytes(blob)).hexdigest()
    assert err.splitlines()[1:] == [f"- snapshot {cut.snapshot_id}: shard shard-00002.bin has sha256 {found}, the "
                                    f"snapshot recorded {cut.shards[2].sha256}"]


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
