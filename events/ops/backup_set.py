"""A backup set: full and incremental backups (:mod:`events.ops.backup`) at one location.

Contract of :func:`create_backup` (one consistent cut, written as the set's next backup):

1. read the ledger's position P and its state (reservations; aggregate snapshots of streams
   that concern no subject) in one snapshot of the database;
2. map P to the topic's ends (:func:`events.store.cut.cut_at`), publishing the outbox first
   when events at or below P still wait there;
3. pin each partition's range: from the topic's beginning (full) or from the parent's end
   (incremental: refused when retention deleted records after the parent, or when the topic
   is behind it), to the cut's end; the registry's range likewise, pinned after the events;
4. read the records in the ranges, tallying counts, hash and chain heads; a record of a
   position above P (re-sent below the ends by a crashed relay) means the cut was not one
   point: cut again from step 1;
5. record what other layers prove at the cut (:data:`PROOFS`: view digests), MAC the
   manifest with the backup key (its parent's MAC included) and write the backup whole.

:func:`verify_set` checks every backup in the set (MAC, hash, counts, chain links from the
parent's heads) and every incremental's link to its parent (the parent exists with the MAC
recorded, and each range starts where the parent's ended). :func:`chain_to` lists the
backups a restore reads, full backup first.

Aggregate snapshots of streams that concern a subject are left out on purpose: they hold
the folded state in plaintext, personal data included, which no backup may hold (keys are
never in a backup, so crypto-shredding reaches every backup's copy of the log). They are a
cache: loads after a restore rebuild them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

import fastavro
import psycopg
from kafka import TopicPartition

from events.adapters import postgres
from events.adapters.storage import Storage
from events.errors import ConfigurationError, EvpError, IntegrityError, NotFound
from events.ops.backup import (
    EVENTS,
    FULL,
    INCREMENTAL,
    MANIFEST_KEY,
    RESERVATIONS,
    SCHEMAS,
    SNAPSHOTS,
    SUFFIX,
    COMPRESSION_LEVEL,
    BackupKey,
    BackupRecord,
    Manifest,
    OnProgress,
    Parent,
    PARSED_SCHEMA,
    Tally,
    read_manifest,
    reporting,
    verify_file,
)
from events.adapters.kafka import consumer, kafka_errors
from events.store.cut import Cut, NotReady, cut_at
from events.store.log import read_pinned
from events.ops.lineage import KEPT, Holding, group_by, trace_subject
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore

#: How many times a backup cuts again when a re-sent record of a later position lies below its ends.
CUT_ATTEMPTS = 5
#: How long a backup waits for the outbox to drain below its cut, publishing when it can.
PUBLISH_WAIT_S = 60.0
#: Other layers' proofs: ``name = "module:object"`` with :class:`ProofProvider`'s methods.
PROOFS = "evp.backup.proofs"


@dataclass(frozen=True)
class ProofCheck:
    """One proof compared after a restore: what the backup recorded and what the restore found."""

    proof: str  #: the provider, e.g. "views"
    name: str  #: what it is about, e.g. a view's name
    recorded: str
    found: str
    detail: str = ""

    @property
    def equal(self) -> bool:
        return self.recorded == self.found


class ProofProvider(Protocol):
    """A layer above ``events`` that proves a restore equal (the projections' view digests)."""

    def record(self, settings: Settings, ends: Mapping[int, int]) -> Mapping[str, Any]:
        """What holds at the cut ``ends`` (JSON); only what is exactly at the cut."""

    def check(self, settings: Settings, recorded: Mapping[str, Any]) -> list[ProofCheck]:
        """Rebuild what was recorded in the restored services of ``settings`` and compare."""


def proof_providers() -> dict[str, ProofProvider]:
    """The installed providers by name (a missing optional layer is skipped)."""
    found: dict[str, ProofProvider] = {}
    for entry in sorted(entry_points(group=PROOFS), key=lambda e: e.name):
        try:
            found[entry.name] = entry.load()
        except ImportError:
            continue
    return found


# -- the set -------------------------------------------------------------------------------
def backup_names(storage: Storage) -> list[str]:
    return [n for n in storage.names() if n.startswith("backup-") and n.endswith(SUFFIX)]


def manifests(storage: Storage) -> list[Manifest]:
    """Every backup's manifest, by sequence; IntegrityError when a file's name and manifest disagree."""
    found: list[Manifest] = []
    for name in backup_names(storage):
        manifest = read_manifest(storage, name)
        if manifest.name != name:
            raise IntegrityError(f"backup {storage.describe(name)} holds the manifest of {manifest.name}: renamed?")
        found.append(manifest)
    return sorted(found, key=lambda m: m.sequence)


def chain_to(storage: Storage, sequence: int | None = None) -> list[Manifest]:
    """The backups a restore of ``sequence`` (default: the newest) reads: its full backup first."""
    every = {m.sequence: m for m in manifests(storage)}
    if not every:
        raise NotFound(f"there is no backup at {storage.location}")
    current = every.get(max(every) if sequence is None else sequence)
    if current is None:
        raise NotFound(f"there is no backup {sequence} at {storage.location} (it holds {sorted(every)})")
    chain = [current]
    while chain[-1].parent is not None:
        parent = chain[-1].parent
        before = every.get(parent.sequence)
        if before is None:
            raise IntegrityError(f"backup {storage.describe(chain[-1].name)} continues backup {parent.sequence}, "
                                 "which is missing from the set")
        chain.append(before)
    return chain[::-1]


def _check_link(storage: Storage, parent: Manifest, child: Manifest) -> None:
    """Step: an incremental continues its parent exactly (MAC, topic, ranges)."""
    where = storage.describe(child.name)
    assert child.parent is not None
    if parent.mac != child.parent.mac:
        raise IntegrityError(f"backup {where} continues backup {parent.sequence} with MAC {child.parent.mac}, but "
                             f"{parent.name} has MAC {parent.mac}: it was replaced after {child.name} was taken")
    if (parent.topic, parent.partitions) != (child.topic, child.partitions):
        raise IntegrityError(f"backup {where} is of topic {child.topic} ({child.partitions} partitions), its parent "
                             f"of {parent.topic} ({parent.partitions})")
    for partition, (start, _) in sorted(child.ranges.items()):
        if start != parent.ranges[partition][1]:
            raise IntegrityError(f"backup {where}: partition {partition} starts at {start}, but its parent ended at "
                                 f"{parent.ranges[partition][1]}")
    if child.schema_range[0] != parent.schema_range[1]:
        raise IntegrityError(f"backup {where}: its schema records start at {child.schema_range[0]}, its parent's "
                             f"ended at {parent.schema_range[1]}")


@dataclass(frozen=True)
class SetReport:
    """What :func:`verify_set` checked."""

    location: str
    backups: tuple[Manifest, ...]

    @property
    def records(self) -> int:
        return sum(m.records for m in self.backups)


def _verify_one(storage: Storage, manifest: Manifest, parent: Manifest | None, key: BackupKey | None,
                on_progress: OnProgress | None) -> Manifest:
    """One backup: its link to ``parent`` (an incremental's), then its file from the parent's chain heads."""
    if manifest.parent is not None:
        if parent is None or parent.sequence != manifest.parent.sequence:
            raise IntegrityError(f"backup {storage.describe(manifest.name)} continues backup "
                                 f"{manifest.parent.sequence}, which is missing from the set")
        _check_link(storage, parent, manifest)
    heads = parent.chain_heads if parent is not None and manifest.parent is not None else None
    return verify_file(storage, manifest.name, key, on_progress=on_progress, heads=heads)


def verify_chain(storage: Storage, chain: Sequence[Manifest], key: BackupKey | None, *,
                 on_progress: OnProgress | None = None) -> list[Manifest]:
    """Verify each backup of ``chain`` (full backup first, as :func:`chain_to` lists it)."""
    return [_verify_one(storage, m, before, key, on_progress) for before, m in zip([None, *chain[:-1]], chain)]


def verify_set(location: str | Path, key: BackupKey | None, *, on_progress: OnProgress | None = None) -> SetReport:
    """Verify every backup at ``location`` and every incremental's link to its parent; see the module docstring."""
    storage = Storage(location)
    every = manifests(storage)
    if not every:
        raise NotFound(f"there is no backup at {storage.location}")
    by_sequence = {m.sequence: m for m in every}
    verified = [_verify_one(storage, m, by_sequence.get(m.parent.sequence) if m.parent else None, key, on_progress)
                for m in every]
    return SetReport(storage.location, tuple(verified))


# -- erasure lineage -----------------------------------------------------------------------
#: Where the ``backups`` lineage source looks: the deployment's backup set.
BACKUP_TARGET_ENV = "EVP_BACKUP_TARGET"


def backup_holdings(settings: Settings, project: Project | None, subject_id: str) -> list[Holding]:
    """The ``backups`` source of :mod:`events.ops.lineage`: per backup, the subject's events it holds, by state.

    1. the set is the one at ``EVP_BACKUP_TARGET`` (none set: nothing to report);
    2. a backup holds every event at or below its cut's ledger position that is not in an
       earlier backup of its chain (an incremental holds only what came after its parent);
    3. each event's state is the lineage trace's (:data:`~events.ops.lineage.HOLDS` while
       the key lives, :data:`~events.ops.lineage.UNREADABLE` once it is destroyed,
       :data:`~events.ops.lineage.KEPT` without personal fields): keys are never in a
       backup, so the erasure reaches every backup's copy.
    """
    location = os.environ.get(BACKUP_TARGET_ENV)
    if not location:
        return []
    storage = Storage(location)
    with EventStore.open(settings) as store:
        trace = trace_subject(store, subject_id)
    out: list[Holding] = []
    every = manifests(storage)
    cut_of = {m.sequence: m.position or 0 for m in every}
    for manifest in every:
        if manifest.topic != settings.events_topic:
            continue
        start = cut_of.get(manifest.parent.sequence, 0) if manifest.parent is not None else 0
        held = [e for e in trace.events if start < e.record.position <= (manifest.position or 0)]
        for state, events in group_by(held, trace.state_of).items():
            out.append(Holding(f"backup {storage.describe(manifest.name)}", "events", len(events), state,
                               "sealed under the subject's key, which no backup holds" if state != KEPT
                               else "no personal field of theirs"))
    return out


# -- creating a backup ---------------------------------------------------------------------
_RESERVATIONS = "SELECT scope, value, stream_id, reserved_at, subject_id FROM evp_reservations ORDER BY scope, value"
_SNAPSHOTS = (
    "SELECT s.stream_id, s.version, s.state, s.taken_at FROM evp_aggregate_snapshots s"
    " WHERE NOT EXISTS (SELECT 1 FROM evp_events e WHERE e.stream_id = s.stream_id AND cardinality(e.subject_ids) > 0)"
    " ORDER BY s.stream_id, s.version"
)


def _state_records(conn: psycopg.Connection[Any]) -> list[BackupRecord]:
    """Step 1: the ledger's state as records (key and value JSON), in file order."""
    records: list[BackupRecord] = []
    for index, (scope, value, stream_id, reserved_at, subject_id) in enumerate(conn.execute(_RESERVATIONS)):
        records.append(_state(RESERVATIONS, index, reserved_at, [scope, value],
                              {"stream_id": stream_id, "subject_id": subject_id}))
    for index, (stream_id, version, state, taken_at) in enumerate(conn.execute(_SNAPSHOTS)):
        records.append(_state(SNAPSHOTS, index, taken_at, [stream_id, version], {"state": state}))
    return records


def _state(source: str, index: int, at: datetime, key: object, value: dict[str, Any]) -> BackupRecord:
    return BackupRecord(source, 0, index, int(at.timestamp() * 1000), json.dumps(key).encode(),
                        json.dumps(value, sort_keys=True).encode())


def _snapshot_of_ledger(settings: Settings) -> tuple[int, list[BackupRecord]]:
    """Step 1: P and the state, in one REPEATABLE READ snapshot."""
    with postgres.connect(settings.database_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            row = conn.execute("SELECT coalesce(max(position), 0) FROM evp_events").fetchone()
            position = int(row[0]) if row else 0
            return position, _state_records(conn)


def _cut(settings: Settings, position: int, publish: Callable[[], object] | None) -> Cut:
    """Step 2: the cut at ``position``, publishing (or waiting for a relay) while the outbox holds events below it."""
    deadline = time.monotonic() + PUBLISH_WAIT_S
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        while True:
            try:
                return cut_at(conn, settings.partitions, position=position)
            except NotReady:
                if time.monotonic() > deadline:
                    raise
                if publish is not None:
                    publish()
                else:
                    time.sleep(0.2)


def _bounds(settings: Settings, topic: str) -> dict[int, tuple[int, int]]:
    """``(beginning, end)`` of every partition right now; NotFound if the topic does not exist."""
    reader = consumer(settings)
    try:
        with kafka_errors(settings):
            partitions = reader.partitions_for_topic(topic)
            if not partitions:
                raise NotFound(f"topic {topic!r} does not exist on {settings.kafka}")
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            starts, ends = reader.beginning_offsets(tps), reader.end_offsets(tps)
            return {tp.partition: (starts[tp], ends[tp]) for tp in tps}
    finally:
        reader.close()


def _ranges(settings: Settings, cut: Cut, parent: Manifest | None) -> dict[int, tuple[int, int]]:
    """Step 3 for the events topic."""
    bounds = _bounds(settings, settings.events_topic)
    if parent is not None and set(bounds) != set(parent.ranges):
        raise ConfigurationError(f"topic {settings.events_topic} has {len(bounds)} partitions, the backup set's "
                                 f"last backup {parent.partitions}: take a full backup into a new location")
    ranges: dict[int, tuple[int, int]] = {}
    for partition, (beginning, now) in sorted(bounds.items()):
        end = max(cut.ends.get(partition, 0), beginning)
        if parent is None:
            ranges[partition] = (beginning, end)
            continue
        after = parent.ranges[partition][1]
        if beginning > after:
            raise EvpError(f"partition {partition}: records [{after}, {beginning}) were deleted (retention) since backup "
                           f"{parent.sequence}: an incremental backup would leave a hole; take a full backup")
        if now < after:
            raise EvpError(f"partition {partition} of {settings.events_topic} ends at {now}, behind backup "
                           f"{parent.sequence} ({after}): the topic was recreated or truncated; take a full backup "
                           "into a new location")
        ranges[partition] = (after, max(end, after))
    return ranges


def _schema_range(settings: Settings, parent: Manifest | None) -> tuple[int, int]:
    try:  # pinned after the events: every schema id a pinned event uses is below this end
        beginning, end = _bounds(settings, settings.schemas_topic)[0]
    except NotFound:
        beginning = end = 0
    start = parent.schema_range[1] if parent is not None else beginning
    if end < start:
        raise EvpError(f"the schema registry's topic {settings.schemas_topic} ends at {end}, behind the last backup "
                       f"({start}): it was recreated; take a full backup into a new location")
    return start, end


def _records(settings: Settings, schema_range: tuple[int, int], ranges: Mapping[int, tuple[int, int]],
             state: Sequence[BackupRecord]) -> Iterator[BackupRecord]:
    for message in read_pinned(settings, settings.schemas_topic, {0: schema_range}, max_poll_records=5000):
        yield BackupRecord.from_message(SCHEMAS, message)
    for message in read_pinned(settings, settings.events_topic, ranges, max_poll_records=5000):
        yield BackupRecord.from_message(EVENTS, message)
    yield from state


def create_backup(
    settings: Settings, location: str | Path, *, incremental: bool = False, key: BackupKey | None = None,
    on_progress: OnProgress | None = None, publish: Callable[[], object] | None = None,
    providers: Mapping[str, ProofProvider] | None = None,
) -> Manifest:
    """Write the set's next backup (full, or ``incremental`` on the newest); see the module docstring.

    ``publish`` publishes the outbox (the CLI passes the store's flush); without it a backup
    waits for a running relay. ``providers`` default to the installed :func:`proof_providers`.
    The manifest is authenticated with ``key``, by default the deployment's backup key
    (created if missing).
    """
    storage = Storage(location)
    key = key if key is not None else BackupKey.from_settings(settings, create=True)
    existing = manifests(storage)
    if existing and existing[-1].topic != settings.events_topic:
        raise ConfigurationError(f"the backup set at {storage.location} holds backups of topic {existing[-1].topic}, "
                                 f"not {settings.events_topic}: use a location of its own for each deployment")
    parent = existing[-1] if incremental and existing else None
    if incremental and parent is None:
        raise NotFound(f"there is no backup at {storage.location} to continue: take a full backup first")
    sequence = existing[-1].sequence + 1 if existing else 1
    for _ in range(CUT_ATTEMPTS):
        position, state = _snapshot_of_ledger(settings)  # step 1
        cut = _cut(settings, position, publish)  # step 2
        ranges, schema_range = _ranges(settings, cut, parent), _schema_range(settings, parent)  # step 3
        manifest = _write(settings, storage, key, sequence, parent, position, ranges, schema_range, state,
                          on_progress, providers)
        if manifest is not None:
            return manifest
    raise EvpError(f"no consistent cut after {CUT_ATTEMPTS} attempts: records of later positions kept appearing below "
                   "the cut (a relay restarting in a loop?); see `evp relay status`")


def _write(
    settings: Settings, storage: Storage, key: BackupKey, sequence: int, parent: Manifest | None, position: int,
    ranges: dict[int, tuple[int, int]], schema_range: tuple[int, int], state: list[BackupRecord],
    on_progress: OnProgress | None, providers: Mapping[str, ProofProvider] | None,
) -> Manifest | None:
    """Steps 4 and 5; None when a record above the cut was found (cut again)."""
    tally = Tally(ranges, schema_range, parent.chain_heads if parent is not None else None)
    total = schema_range[1] - schema_range[0] + sum(end - start for start, end in ranges.values()) + len(state)
    created_at = datetime.now(UTC).isoformat()

    def tallied() -> Iterator[dict[str, Any]]:
        for record in reporting(_records(settings, schema_range, ranges, state), "read", total, on_progress):
            tally.add(record)
            yield record.to_avro()

    with tempfile.TemporaryFile(prefix=".evp-backup.", suffix=".spool") as spool:
        fastavro.writer(spool, PARSED_SCHEMA, tallied(), codec="null")
        if tally.max_position > position:
            return None
        ends = {p: end for p, (_, end) in ranges.items()}
        recorded = {name: dict(p.record(settings, ends))
                    for name, p in (proof_providers() if providers is None else providers).items()}
        manifest = Manifest(
            topic=settings.events_topic, schemas_topic=settings.schemas_topic, ranges=dict(ranges),
            schema_range=schema_range, counts=dict(tally.counts), schema_records=tally.schema_records,
            sha256=tally.sha256(), created_at=created_at, mac_key_id=key.key_id, sequence=sequence,
            kind=INCREMENTAL if parent is not None else FULL,
            parent=Parent(parent.sequence, parent.mac or "") if parent is not None else None,
            position=position, chain_heads=dict(tally.heads), state=dict(tally.state), proofs=recorded,
        )
        manifest = replace(manifest, mac=key.mac(manifest))
        spool.seek(0)
        spooled = fastavro.reader(spool, reader_schema=PARSED_SCHEMA)  # already tallied: copied as they are
        records = reporting(spooled, "write", tally.seen, on_progress)
        storage.create(manifest.name, lambda out: fastavro.writer(
            out, PARSED_SCHEMA, records, codec="deflate", codec_compression_level=COMPRESSION_LEVEL,
            metadata={MANIFEST_KEY: manifest.to_json()},
        ))
    return manifest
