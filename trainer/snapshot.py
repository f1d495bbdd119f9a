"""Dataset snapshots: a promise about exactly which events a dataset came from.

Creating a snapshot:

1. publish the outbox (so everything appended so far is on the topic);
2. pin, per partition, the offset range ``[0, end)`` to read;
3. read exactly those records, drop relay duplicates, fold them with the transform;
4. hash the folded rows (the content hash) and write them as shards with their own hashes;
5. record the manifest locally and as a ``SnapshotCreated`` event.

Verifying re-reads the pinned ranges from Kafka, folds again and compares the content hash,
then checks every shard's hash: a snapshot that verifies is byte-for-byte what was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from events.store.client import EventStore
from events.errors import IntegrityError, NotFound
from events.event import Event
from events.adapters.files import write_bytes_atomically
from events.ids import uuid7
from events.store.log import BadRecord, Deduplicator, LogRecord, end_offsets, read_range
from trainer.data import Examples
from trainer.shards import FEATURES, ShardInfo, read_shards, write_shards

TRANSFORM = "digits-current-label"
TRANSFORM_VERSION = 1
Progress = Callable[[int], None]


@dataclass(frozen=True)
class SnapshotManifest:
    snapshot_id: str
    topic: str
    ranges: dict[int, tuple[int, int]]
    schema_ids: tuple[int, ...]
    transform: str
    transform_version: int
    content_hash: str
    record_count: int
    sample_count: int
    shards: tuple[ShardInfo, ...]
    skipped_records: int = 0

    def to_json(self) -> str:
        body = asdict(self)
        body["ranges"] = {str(p): list(r) for p, r in sorted(self.ranges.items())}
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SnapshotManifest:
        body = json.loads(text)
        body["ranges"] = {int(p): (int(r[0]), int(r[1])) for p, r in body["ranges"].items()}
        body["schema_ids"] = tuple(body["schema_ids"])
        body["shards"] = tuple(ShardInfo(**s) for s in body["shards"])
        return cls(**body)


@dataclass
class Fold:
    """The transform: current label of every sample; corrections applied, retractions removed."""

    samples: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    schema_ids: set[int] = field(default_factory=set)
    records: int = 0
    skipped: int = 0

    def apply(self, record: LogRecord) -> None:
        self.records += 1
        self.schema_ids.add(record.schema_id)
        kind = record.event_type.rsplit(".", 1)[-1]
        data = record.data
        if kind == "SampleSubmitted":
            self.samples[data["sample_id"]] = (np.asarray(data["features"], dtype=np.float32), int(data["label"]))
        elif kind == "LabelCorrected" and data["sample_id"] in self.samples:
            features, _ = self.samples[data["sample_id"]]
            self.samples[data["sample_id"]] = (features, int(data["label"]))
        elif kind == "SampleRetracted":
            self.samples.pop(data["sample_id"], None)

    def examples(self) -> Examples:
        ids = tuple(sorted(self.samples))
        features = np.stack([self.samples[i][0] for i in ids]) if ids else np.zeros((0, FEATURES), np.float32)
        labels = np.array([self.samples[i][1] for i in ids], dtype=np.int64)
        return Examples(ids, features, labels)


def content_hash(examples: Examples) -> str:
    """sha256 over the transform's identity and the rows in sample-id order."""
    digest = hashlib.sha256(f"{TRANSFORM}/v{TRANSFORM_VERSION}\n".encode())
    for sample_id, features, label in zip(examples.sample_ids, examples.features, examples.labels):
        digest.update(sample_id.encode() + b"\0")
        digest.update(np.asarray(label, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
    return digest.hexdigest()


def fold_range(store: EventStore, ranges: dict[int, tuple[int, int]], progress: Progress | None = None) -> Fold:
    fold, dedupe = Fold(), Deduplicator()
    for item in read_range(store.settings.kafka, store.settings.events_topic, store.codec, ranges):
        if isinstance(item, BadRecord):
            fold.skipped += 1
        elif dedupe.is_new(item):
            fold.apply(item)
        if progress:
            progress(1)
    return fold


def snapshot_dir(store: EventStore, snapshot_id: str) -> Path:
    return store.settings.snapshots_dir / snapshot_id


def create_snapshot(store: EventStore, progress: Progress | None = None, *, actor: str = "evp") -> SnapshotManifest:
    store.flush()
    ends = end_offsets(store.settings.kafka, store.settings.events_topic)
    ranges = {p: (0, end) for p, end in ends.items()}
    fold = fold_range(store, ranges, progress)
    examples = fold.examples()
    snapshot_id = f"snap-{uuid7().hex[:12]}"
    folder = snapshot_dir(store, snapshot_id)
    shards = write_shards(examples, folder)
    manifest = SnapshotManifest(
        snapshot_id=snapshot_id, topic=store.settings.events_topic, ranges=ranges,
        schema_ids=tuple(sorted(fold.schema_ids)), transform=TRANSFORM, transform_version=TRANSFORM_VERSION,
        content_hash=content_hash(examples), record_count=fold.records, sample_count=len(examples),
        shards=tuple(shards), skipped_records=fold.skipped,
    )
    write_bytes_atomically(folder / "manifest.json", manifest.to_json().encode())
    store.append(f"snapshot-{snapshot_id}", Event("SnapshotCreated", _event_data(manifest), actor=actor))
    store.flush()
    return manifest


def _event_data(m: SnapshotManifest) -> dict[str, object]:
    return {
        "snapshot_id": m.snapshot_id, "topic": m.topic,
        "ranges": [{"partition": p, "start": s, "end": e} for p, (s, e) in sorted(m.ranges.items())],
        "schema_ids": list(m.schema_ids), "transform": m.transform, "transform_version": m.transform_version,
        "content_hash": m.content_hash, "record_count": m.record_count, "sample_count": m.sample_count,
        "shards": [asdict(s) for s in m.shards],
    }


def _from_event(data: Mapping[str, Any]) -> SnapshotManifest:
    ranges = {int(r["partition"]): (int(r["start"]), int(r["end"])) for r in data["ranges"]}
    return SnapshotManifest(
        snapshot_id=str(data["snapshot_id"]), topic=str(data["topic"]), ranges=ranges,
        schema_ids=tuple(data["schema_ids"]), transform=str(data["transform"]),
        transform_version=int(data["transform_version"]), content_hash=str(data["content_hash"]),
        record_count=int(data["record_count"]), sample_count=int(data["sample_count"]),
        shards=tuple(ShardInfo(**s) for s in data["shards"]),
    )


def load_manifest(store: EventStore, snapshot_id: str) -> SnapshotManifest:
    """The manifest as recorded in the log (the local copy is only a cache and must agree)."""
    try:
        events = store.read_stream(f"snapshot-{snapshot_id}", decrypt=False)
    except NotFound as err:
        raise NotFound(f"snapshot {snapshot_id!r} was never recorded") from err
    return _from_event(events[0].data)


def load_examples(store: EventStore, snapshot_id: str) -> Examples:
    """The snapshot's rows from its shards, re-materializing them from Kafka when they are missing."""
    manifest = load_manifest(store, snapshot_id)
    folder = snapshot_dir(store, snapshot_id)
    if not all((folder / s.name).is_file() for s in manifest.shards):
        rematerialize(store, manifest)
    return read_shards(folder, list(manifest.shards))


def rematerialize(store: EventStore, manifest: SnapshotManifest, progress: Progress | None = None) -> Examples:
    examples = fold_range(store, manifest.ranges, progress).examples()
    actual = content_hash(examples)
    if actual != manifest.content_hash:
        raise IntegrityError(f"snapshot {manifest.snapshot_id}: Kafka now yields content hash {actual[:16]}…, recorded {manifest.content_hash[:16]}…")
    write_shards(examples, snapshot_dir(store, manifest.snapshot_id))
    return examples


@dataclass(frozen=True)
class Verification:
    snapshot_id: str
    content_hash: str
    records_read: int
    shards_checked: int


def verify_snapshot(store: EventStore, snapshot_id: str, progress: Progress | None = None) -> Verification:
    """Re-read the pinned ranges, re-fold, compare the content hash, then check every shard."""
    manifest = load_manifest(store, snapshot_id)
    fold = fold_range(store, manifest.ranges, progress)
    actual = content_hash(fold.examples())
    if actual != manifest.content_hash:
        raise IntegrityError(
            f"snapshot {snapshot_id}: re-reading Kafka gives content hash {actual[:16]}…, recorded {manifest.content_hash[:16]}…"
        )
    folder = snapshot_dir(store, snapshot_id)
    checked = 0
    if all((folder / s.name).is_file() for s in manifest.shards):
        read_shards(folder, list(manifest.shards))
        checked = len(manifest.shards)
    return Verification(snapshot_id, actual, fold.records, checked)


def snapshot_ids(store: EventStore) -> Iterable[str]:
    return [s.removeprefix("snapshot-") for s in store.ledger.streams_with_prefix("snapshot-")]
