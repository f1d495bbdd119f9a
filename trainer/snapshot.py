"""Dataset snapshots: a promise about exactly which events a dataset's rows came from.

Creating a snapshot of a dataset (:func:`create_snapshot`):

1. publish the outbox, so everything appended so far is on the topic;
2. pin, per partition, the offset range ``[0, end)`` to read: the topic's ends now, or, for a
   snapshot as the log was (``position`` or ``as_of``), the ends of that cut
   (:mod:`events.store.cut`), whose position the manifest records as ``cut_position``;
3. read exactly those records, skip those a cut does not admit (a relay's re-send of a later
   position below an end), drop relay duplicates, open personal fields of the records the
   dataset handles, and fold them with the dataset's handlers (:mod:`trainer.dataset`);
4. hash ``(name, version, row id, columns, rows)`` (the content hash) and write the rows as
   self-describing shards, each with its own sha256;
5. record the manifest locally (``manifest.json`` beside the shards) and as a
   ``SnapshotCreated`` event in stream ``snapshot-<id>``.

Verifying (:func:`verify_snapshot`) re-reads the pinned ranges from Kafka, folds again with
the dataset's current code (refusing a changed name or version), compares the content hash,
then checks every shard's presence, hash and columns: a snapshot that verifies is
byte-for-byte what was trained on. :func:`check_shards` does the shard half alone, from
the local manifest, on a machine without Kafka.

A snapshot an erasure purged (:mod:`trainer.erasure`: its shards held a forgotten
subject's personal data decrypted, and were deleted) is refused by every reader here —
loading, re-materializing, verifying, checking its shards — with
:class:`~events.errors.SnapshotPurged`, naming the erasure: its rows cannot come back, since
re-reading the log now gives other rows; a new snapshot is cut instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from events.adapters.files import write_bytes_atomically
from events.errors import ConfigurationError, IntegrityError, NotFound
from events.gc_pause import gc_paused
from events.event import Event
from events.ids import uuid7
from events.project import Project
from events.store.client import EventStore
from events.store.cut import Cut, cut_at
from events.store.log import BadRecord, Deduplicator, decode_record, end_offsets, read_pinned
from trainer.data import Column, Table
from trainer.dataset import Dataset, Fold, SourceEvent, content_hash
from trainer.purge import refuse_purged
from trainer.shards import ShardInfo, read_shards, write_shards

Progress = Callable[[int], None]
MANIFEST = "manifest.json"
#: A snapshot id, as :func:`create_snapshot` makes them (``snap-`` and 12 hex digits) or
#: close to it: nothing that could leave the snapshots folder (no ``/``, ``.``, ``\\``).
SNAPSHOT_ID = re.compile(r"snap-[0-9a-z]{1,40}")


def check_snapshot_id(snapshot_id: object) -> str:
    """``snapshot_id`` if it matches :data:`SNAPSHOT_ID`; ConfigurationError naming it otherwise.

    Called before any path or stream name is built from an id.
    """
    if not isinstance(snapshot_id, str) or not SNAPSHOT_ID.fullmatch(snapshot_id):
        raise ConfigurationError(
            f"snapshot id {snapshot_id!r} is not valid: it must be 'snap-' followed by 1 to 40 lower-case letters or "
            "digits (as evp makes them, e.g. snap-0192f3a4b5c6)"
        )
    return snapshot_id


@dataclass(frozen=True)
class SnapshotManifest:
    snapshot_id: str
    topic: str
    dataset: str  #: the dataset's declared name
    dataset_version: int
    declaration: str  #: ``module:attribute`` of the dataset class, to fold again on verify
    row_id: str
    columns: tuple[Column, ...]
    ranges: dict[int, tuple[int, int]]
    schema_ids: tuple[int, ...]
    content_hash: str
    record_count: int
    row_count: int
    shards: tuple[ShardInfo, ...]
    #: the ledger position of an as-of snapshot: records above it are skipped whenever the ranges
    #: are read (None: every record in the ranges counts)
    cut_position: int | None = None

    def identity(self) -> dict[str, Any]:
        return {"name": self.dataset, "version": self.dataset_version, "row_id": self.row_id,
                "columns": [c.describe() for c in self.columns]}

    def to_event(self) -> dict[str, Any]:
        """The ``SnapshotCreated`` data (also the local manifest's JSON)."""
        return {
            "snapshot_id": self.snapshot_id, "topic": self.topic, "dataset": self.dataset,
            "dataset_version": self.dataset_version, "declaration": self.declaration, "row_id": self.row_id,
            "columns": [{"name": c.name, "dtype": c.dtype, "shape": list(c.shape)} for c in self.columns],
            "ranges": [{"partition": p, "start": s, "end": e} for p, (s, e) in sorted(self.ranges.items())],
            "schema_ids": list(self.schema_ids), "content_hash": self.content_hash,
            "record_count": self.record_count, "row_count": self.row_count,
            "shards": [asdict(s) for s in self.shards], "cut_position": self.cut_position,
        }

    @classmethod
    def from_event(cls, data: Mapping[str, Any]) -> SnapshotManifest:
        return cls(
            snapshot_id=check_snapshot_id(data["snapshot_id"]), topic=str(data["topic"]), dataset=str(data["dataset"]),
            dataset_version=int(data["dataset_version"]), declaration=str(data["declaration"]),
            row_id=str(data["row_id"]), columns=tuple(Column.from_description(c) for c in data["columns"]),
            ranges={int(r["partition"]): (int(r["start"]), int(r["end"])) for r in data["ranges"]},
            schema_ids=tuple(int(i) for i in data["schema_ids"]), content_hash=str(data["content_hash"]),
            record_count=int(data["record_count"]), row_count=int(data["row_count"]),
            shards=tuple(ShardInfo(str(s["name"]), str(s["sha256"]), int(s["rows"])) for s in data["shards"]),
            cut_position=None if data.get("cut_position") is None else int(data["cut_position"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_event(), indent=2, sort_keys=True)


def declaration_of(cls: type) -> str:
    """``module:qualname`` of a class: where :meth:`Project.load` finds it again."""
    return f"{cls.__module__}:{cls.__qualname__}"


def load_dataset(project: Project, name: str) -> Dataset:
    """The dataset ``name`` (an ``evp.toml`` name or ``module:attribute``), instantiated and checked."""
    declared = project.load("datasets", name)
    if not isinstance(declared, type) or not issubclass(declared, Dataset):
        raise ConfigurationError(f"datasets.{name} is {declared!r}, not a subclass of trainer.dataset.Dataset")
    declared.check()
    return declared()


def fold_range(store: EventStore, dataset: Dataset, ranges: Mapping[int, tuple[int, int]],
               progress: Progress | None = None, *, cut_position: int | None = None) -> Fold:
    """Step 3 of creation: read, skip what the cut at ``cut_position`` does not admit (when
    given), dedupe, open personal fields of handled records, fold."""
    fold, dedupe = Fold(dataset), Deduplicator()
    admits = Cut(cut_position).admits if cut_position is not None else None
    with gc_paused():  # the fold keeps every row: collections would walk them again and again
        _fold_records(store, fold, dedupe, ranges, progress, admits)
    return fold


def _fold_records(store: EventStore, fold: Fold, dedupe: Deduplicator, ranges: Mapping[int, tuple[int, int]],
                  progress: Progress | None, admits: Callable[[Iterable[tuple[str, bytes]]], bool] | None) -> None:
    settings = store.settings
    for message in read_pinned(settings, settings.events_topic, ranges):
        if progress:
            progress(1)
        if admits is not None and not admits(message.headers or ()):
            continue  # above the cut: a re-send of a later position below an end
        item = decode_record(store.codec, message)
        if isinstance(item, BadRecord):
            # A record that does not decode is the dead-letter path's business; a dataset
            # cannot fold it, and which records were skipped is fixed by the pinned ranges.
            continue
        if not dedupe.is_new(item):
            continue
        fold.records += 1
        fold.schema_ids.add(item.schema_id)
        handler = fold.wants(item.event_type)
        if handler is None:
            continue
        event = SourceEvent(type=item.event_type, data=store.decrypt(item), stream_id=item.stream_id,
                            version=item.version, actor=item.actor, occurred_at=item.occurred_at,
                            partition=item.partition, offset=item.offset)
        fold.apply(event, handler)


def snapshot_dir(store: EventStore, snapshot_id: str) -> Path:
    return store.settings.snapshots_dir / check_snapshot_id(snapshot_id)


def create_snapshot(store: EventStore, dataset: Dataset, progress: Progress | None = None, *,
                    position: int | None = None, as_of: datetime | None = None) -> SnapshotManifest:
    """Cut a snapshot of ``dataset`` at the topic's current end, or as the log was at ledger
    ``position`` or at time ``as_of`` (one at most); see the module docstring."""
    store.flush()
    cut_position: int | None = None
    if position is None and as_of is None:
        ranges = {p: (0, end) for p, end in end_offsets(store.settings, store.settings.events_topic).items()}
    else:
        cut = cut_at(store.ledger.connection, store.settings.partitions, position=position, time=as_of)
        ranges, cut_position = cut.ranges, cut.position
    fold = fold_range(store, dataset, ranges, progress, cut_position=cut_position)
    table = fold.table()
    snapshot_id = f"snap-{uuid7().hex[:12]}"
    shards = write_shards(table, snapshot_dir(store, snapshot_id))
    manifest = SnapshotManifest(
        snapshot_id=snapshot_id, topic=store.settings.events_topic, dataset=dataset.name,
        dataset_version=dataset.version, declaration=declaration_of(type(dataset)), row_id=dataset.row_id,
        columns=tuple(dataset.columns), ranges=ranges, schema_ids=tuple(sorted(fold.schema_ids)),
        content_hash=content_hash(dataset.identity(), table), record_count=fold.records, row_count=len(table),
        shards=tuple(shards), cut_position=cut_position,
    )
    write_bytes_atomically(snapshot_dir(store, snapshot_id) / MANIFEST, manifest.to_json().encode())
    store.append(f"snapshot-{snapshot_id}", Event("SnapshotCreated", manifest.to_event(), actor=store.settings.actor))
    store.flush()
    return manifest


def load_manifest(store: EventStore, snapshot_id: str) -> SnapshotManifest:
    """The manifest as recorded in the log (the local copy is only a cache)."""
    check_snapshot_id(snapshot_id)
    try:
        events = store.read_stream(f"snapshot-{snapshot_id}", decrypt=False)
    except NotFound as err:
        raise NotFound(f"snapshot {snapshot_id!r} was never recorded") from err
    return SnapshotManifest.from_event(events[0].data)


def load_table(store: EventStore, snapshot_id: str, project: Project | None = None) -> Table:
    """The snapshot's rows from its verified shards, in memory (see :func:`shards_ready`)."""
    manifest, folder = shards_ready(store, snapshot_id, project)
    return read_shards(folder, manifest.shards, manifest.columns)


def shards_ready(store: EventStore, snapshot_id: str, project: Project | None = None) -> tuple[SnapshotManifest, Path]:
    """The snapshot's manifest and the folder its shards are in, to read or stream.

    1. a snapshot an erasure purged is refused (:class:`~events.errors.SnapshotPurged`);
    2. when shards are missing and ``project`` is given, they are re-materialized from Kafka
       (and must hash to the recorded content hash); without a project a missing shard is an
       IntegrityError when it is read.
    """
    manifest = load_manifest(store, snapshot_id)
    folder = snapshot_dir(store, snapshot_id)
    refuse_purged(folder)
    if project is not None and not all((folder / s.name).is_file() for s in manifest.shards):
        rematerialize(store, manifest, project)
    return manifest, folder


def _dataset_for(manifest: SnapshotManifest, project: Project) -> Dataset:
    dataset = load_dataset(project, manifest.declaration)
    if (dataset.name, dataset.version) != (manifest.dataset, manifest.dataset_version):
        raise IntegrityError(
            f"snapshot {manifest.snapshot_id} was cut by dataset {manifest.dataset!r} version "
            f"{manifest.dataset_version}; {manifest.declaration} is now {dataset.name!r} version {dataset.version}"
        )
    return dataset


def _refold(store: EventStore, manifest: SnapshotManifest, project: Project,
            progress: Progress | None) -> tuple[Table, Fold]:
    fold = fold_range(store, _dataset_for(manifest, project), manifest.ranges, progress,
                      cut_position=manifest.cut_position)
    table = fold.table()
    actual = content_hash(manifest.identity(), table)
    if actual != manifest.content_hash:
        raise IntegrityError(f"snapshot {manifest.snapshot_id}: re-reading Kafka gives content hash {actual[:16]}…, "
                             f"recorded {manifest.content_hash[:16]}…")
    return table, fold


def rematerialize(store: EventStore, manifest: SnapshotManifest, project: Project,
                  progress: Progress | None = None) -> Table:
    """Fold the pinned ranges again and rewrite the shards (byte-identical when the hash agrees);
    a snapshot an erasure purged is refused (:class:`~events.errors.SnapshotPurged`)."""
    refuse_purged(snapshot_dir(store, manifest.snapshot_id))
    table, _ = _refold(store, manifest, project, progress)
    write_shards(table, snapshot_dir(store, manifest.snapshot_id))
    return table


@dataclass(frozen=True)
class Verification:
    snapshot_id: str
    content_hash: str
    records_read: int
    shards_checked: int


def verify_snapshot(store: EventStore, snapshot_id: str, project: Project,
                    progress: Progress | None = None) -> Verification:
    """Check a snapshot against Kafka and its shards; the ``SnapshotCreated`` event is the record.

    A snapshot an erasure purged is refused before any step (:class:`~events.errors.SnapshotPurged`,
    naming the erasure): there are no shards to check, and the log no longer gives its rows.

    1. every pinned range must lie within its partition of the topic (the partition exists and
       ends at or after the range's end);
    2. the dataset named in the snapshot must still have the recorded name and version;
    3. re-folding the pinned ranges must give the recorded content hash, record count, schema
       ids and row count (skipped when step 1 or 2 failed: the ranges cannot be read as recorded);
    4. every shard must be present, with its recorded sha256, columns and row count, and the
       shards' rows must hash to the content hash (:func:`check_shards`);
    5. the local ``manifest.json``, when there is one, must say what the log says (it is only a
       copy, but :func:`check_shards` trusts it on a machine without Kafka).

    Every step runs even after another failed; one IntegrityError then names each failure, with
    the snapshot id and the recorded and found values.
    """
    manifest = load_manifest(store, snapshot_id)
    folder = snapshot_dir(store, snapshot_id)
    refuse_purged(folder)
    problems = _range_problems(store, manifest)
    records = 0
    if not problems:
        try:
            table, fold = _refold(store, manifest, project, progress)
        except IntegrityError as err:
            problems.append(str(err))
        else:
            records = fold.records
            problems.extend(_fold_problems(manifest, fold, table))
    try:
        check_shards(folder, manifest)
    except IntegrityError as err:
        problems.append(str(err))
    problems.extend(_copy_problems(folder, manifest))
    if problems:
        raise IntegrityError(f"snapshot {snapshot_id} does not verify:\n" + "\n".join(f"- {p}" for p in problems))
    return Verification(snapshot_id, manifest.content_hash, records, len(manifest.shards))


def _range_problems(store: EventStore, manifest: SnapshotManifest) -> list[str]:
    """Step 1: each pinned range the topic cannot serve (reading it would wait for records that never come)."""
    topic = store.settings.events_topic
    ends = end_offsets(store.settings, topic)
    problems: list[str] = []
    for partition, (start, end) in sorted(manifest.ranges.items()):
        pinned = f"snapshot {manifest.snapshot_id} pins partition {partition} offsets [{start}, {end})"
        if partition not in ends:
            problems.append(f"{pinned}, but topic {topic} has no partition {partition}")
        elif not 0 <= start <= end:
            problems.append(f"{pinned}, which is not a range of offsets")
        elif end > ends[partition]:
            problems.append(f"{pinned}, but the partition ends at offset {ends[partition]}: records the snapshot was "
                            "cut from are gone from the topic, or the pinned range was changed")
    return problems


def _fold_problems(manifest: SnapshotManifest, fold: Fold, table: Table) -> list[str]:
    """Step 3 past the content hash: what a re-fold counted that the snapshot recorded otherwise.

    A range moved over records the dataset does not handle keeps the content hash: the record
    count and the schema ids still tell.
    """
    found = {"record count": fold.records, "schema ids": list(sorted(fold.schema_ids)), "row count": len(table)}
    recorded = {"record count": manifest.record_count, "schema ids": list(manifest.schema_ids),
                "row count": manifest.row_count}
    return [f"snapshot {manifest.snapshot_id}: re-reading the pinned ranges {_shown_ranges(manifest)} gives {what} "
            f"{found[what]}, the snapshot recorded {recorded[what]}" for what in found if found[what] != recorded[what]]


def _shown_ranges(manifest: SnapshotManifest) -> str:
    return ", ".join(f"{p}:[{s}, {e})" for p, (s, e) in sorted(manifest.ranges.items())) or "(none)"


def _copy_problems(folder: Path, manifest: SnapshotManifest) -> list[str]:
    """Step 5: each field where the local ``manifest.json`` differs from the log's record."""
    path = folder / MANIFEST
    if not path.is_file():
        return []  # a copy, not the record: verify reads the log's
    try:
        local = read_manifest_file(path)
    except IntegrityError as err:
        return [str(err)]
    return [f"snapshot {manifest.snapshot_id}: {MANIFEST} holds {where} = {json.dumps(found)}, the SnapshotCreated "
            f"event in the log records {json.dumps(recorded)} (the log is the record)"
            for where, recorded, found in _differences("", manifest.to_event(), local.to_event())]


def _differences(where: str, recorded: Any, found: Any) -> Iterable[tuple[str, Any, Any]]:
    """(path, recorded, found) for each leaf where two JSON values differ, e.g. ``shards[0].sha256``."""
    if isinstance(recorded, dict) and isinstance(found, dict):
        for key in sorted(set(recorded) | set(found)):
            yield from _differences(f"{where}.{key}" if where else key, recorded.get(key), found.get(key))
    elif isinstance(recorded, list) and isinstance(found, list) and len(recorded) == len(found):
        for index, (one, other) in enumerate(zip(recorded, found)):
            yield from _differences(f"{where}[{index}]", one, other)
    elif recorded != found:
        yield where, recorded, found


def read_manifest_file(path: Path) -> SnapshotManifest:
    """A local ``manifest.json``; IntegrityError naming it when it is not a manifest."""
    try:
        return SnapshotManifest.from_event(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, ConfigurationError) as err:
        raise IntegrityError(f"{path} is not a readable snapshot manifest: {err!r}") from err


def check_shards(folder: Path, manifest: SnapshotManifest | None = None) -> Table:
    """Verify shards without Kafka: against ``manifest``, or the ``manifest.json`` beside them.

    A folder an erasure purged is refused before any step (:class:`~events.errors.SnapshotPurged`).

    1. every shard the manifest lists must be present, with its recorded sha256, columns and
       row count (:func:`trainer.shards.read_shards`: every shard is checked, a missing one too);
    2. the shards' rows must hash to the manifest's content hash and number its row count.
    Any failure is an IntegrityError naming the snapshot, the shard and the recorded and found values.
    """
    refuse_purged(folder)
    if manifest is None:
        path = folder / MANIFEST
        if not path.is_file():
            raise NotFound(f"no {MANIFEST} in {folder}")
        manifest = read_manifest_file(path)
    table = read_shards(folder, manifest.shards, manifest.columns, owner=f"snapshot {manifest.snapshot_id}")
    actual = content_hash(manifest.identity(), table)
    if actual != manifest.content_hash:
        raise IntegrityError(f"snapshot {manifest.snapshot_id}: the shards' rows hash to content hash {actual}, "
                             f"the snapshot recorded {manifest.content_hash}")
    if len(table) != manifest.row_count:
        raise IntegrityError(f"snapshot {manifest.snapshot_id}: the shards hold {len(table)} rows, the snapshot "
                             f"recorded {manifest.row_count}")
    return table


def snapshot_ids(store: EventStore) -> Iterable[str]:
    return [s.removeprefix("snapshot-") for s in store.ledger.streams_with_prefix("snapshot-")]
