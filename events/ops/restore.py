"""Restoring a backup chain (see :mod:`events.ops.backup_set`) into empty services, then proving it equal.

Contract of :func:`restore_backup` (into the *current* settings, typically a new topic
prefix and a new database):

1. authenticate and verify every backup of the chain first (full backup, then each
   incremental up to the one asked for: MACs under the backup key of ``settings``, or
   ``backup_key``, hashes, links); refuse unless the target's events topic and ledger are
   empty and its schema registry holds nothing but (a prefix of) the chain's schemas;
2. copy wrapped data keys and tombstones from a live key store, when one is given;
3. append the schema records (same ids; subjects renamed to the target topic);
4. produce every event record with its key, headers, value and timestamp to its partition,
   in offset order, with the idempotent producer, and wait for every acknowledgement;
5. in one PostgreSQL transaction rebuild the ledger from the records — one row per
   ``(stream, version)`` (relay duplicates skipped), with the new Kafka offsets, their chain
   links and each partition's chain head, and no outbox rows — the streams' versions, and the
   newest backup's reservations and aggregate snapshots. Erasures recorded in the log are
   applied to the target's key store (and release the subject's reservations), so a key
   copied from an older key backup cannot undo them;
6. prove the restore equal: re-read the restored topic and follow its hash chains, whose
   heads must equal the backup's; then each proof provider (the projections' view digests)
   rebuilds what it recorded at the cut and compares. Each comparison is in the report
   (:attr:`RestoreReport.proofs`); ``evp backup restore`` exits 1 unless all are equal.

A restore that dies halfway leaves a non-empty topic, so a rerun refuses: restore again
under a new topic prefix and into a new database (or delete the half-restored ones).
"""

from __future__ import annotations

import json
import uuid
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from events.adapters import postgres
from events.schema.catalog import Catalog
from events.schema.codec import Codec, split_value
from events.errors import ConfigurationError, DecodeError, EvpError, IntegrityError, InvalidEvent
from events.event import (
    HEADER_ACTOR,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_OCCURRED_AT,
    HEADER_POSITION,
    HEADER_STREAM_VERSION,
)
from events.adapters.kafka import ensure_event_topics, kafka_errors, producer
from events.privacy.keyring import KeyStore, PostgresKeyStore
from events.store.ledger import check_stream_id, check_text
from events.store.log import end_offsets, read_pinned
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.adapters.storage import Storage
from events.ops.backup import (
    EVENTS,
    PRODUCE_CHUNK,
    RESERVATIONS,
    SCHEMAS,
    SNAPSHOTS,
    SOURCES,
    BackupFile,
    BackupKey,
    BackupRecord,
    Manifest,
    OnProgress,
    reporting,
)
from events.ops.backup_set import ProofCheck, ProofProvider, chain_to, proof_providers, verify_chain
from events.store.chain import FOLLOWS, RESENT, Walk, link_header
from events.settings import Settings

@dataclass(frozen=True)
class RestoreReport:
    """What a restore wrote."""

    topic: str
    records: int  #: event records produced (relay duplicates included, as on the source topic)
    schema_records: int  #: schema records appended (fewer than the backup's when a rerun found some)
    ledger_events: int  #: ledger rows written
    duplicates: int  #: records whose (stream, version) was already restored: relay re-sends
    foreign: int  #: records without evp's key and headers: on the topic, not in the ledger
    streams: int
    offsets_preserved: bool  #: every record has its old offset (true when the backup started at 0)
    keys_copied: int = 0
    erasures_applied: tuple[str, ...] = ()  #: subjects whose SubjectForgotten is in the log
    incomplete_streams: tuple[str, ...] = field(default=())  #: streams whose versions do not start at 1 or have gaps
    backups: tuple[int, ...] = ()  #: the sequences of the backups read, full backup first
    position: int | None = None  #: the ledger position of the newest backup's cut
    reservations: int = 0
    snapshots: int = 0  #: aggregate snapshots restored
    proofs: tuple[ProofCheck, ...] = ()  #: chain heads and view digests, recorded vs found

    @property
    def proved(self) -> bool:
        """Whether every proof the backup recorded holds in the restored copy."""
        return all(check.equal for check in self.proofs)

    def __str__(self) -> str:
        offsets = "offsets preserved" if self.offsets_preserved else "offsets shifted (the backup did not start at offset 0)"
        lines = [
            f"restored backups {', '.join(map(str, self.backups))} (cut at ledger position {self.position}): "
            f"{self.records} records to {self.topic} ({offsets}), {self.schema_records} schema records, "
            f"{self.ledger_events} ledger events in {self.streams} streams ({self.duplicates} relay duplicates "
            f"skipped, {self.foreign} foreign records left out of the ledger), {self.reservations} reservations, "
            f"{self.snapshots} aggregate snapshots, {self.keys_copied} keys copied, "
            f"{len(self.erasures_applied)} erasures applied",
        ]
        for check in self.proofs:
            verdict = "equal" if check.equal else f"DIFFERENT: backup {check.recorded}, restored {check.found}"
            lines.append(f"  {check.proof} {check.name}: {verdict}" + (f" ({check.detail})" if check.detail else ""))
        if self.proofs:
            lines.append("proved equal to the backup" if self.proved else "NOT equal to the backup")
        return "\n".join(lines)


def copy_keys(source: KeyStore, target: KeyStore) -> int:
    """Copy wrapped data keys (never plaintext) and tombstones; an erasure on either side wins."""
    copied = 0
    for row in source.all():
        stored = target.put_if_absent(row)
        if row.erased and not stored.erased:
            target.erase(row.subject_id)
        copied += 1
    return copied


def retarget_schema_record(value: bytes, old_topic: str, new_topic: str) -> bytes:
    """A registry record with its subject moved from ``old_topic`` to ``new_topic``.

    Subjects follow the topic-record-name strategy (``<topic>-<record>``): renamed, the
    restored topic's producers find the restored ids instead of registering copies. Ids,
    versions and schemas are untouched; a record that is not a registry record is kept as is.
    """
    if old_topic == new_topic:
        return value
    try:
        body = json.loads(value)
        subject = body["subject"]
    except (ValueError, KeyError, TypeError):
        return value
    if not isinstance(subject, str) or not subject.startswith(f"{old_topic}-"):
        return value
    body["subject"] = f"{new_topic}-{subject.removeprefix(f'{old_topic}-')}"
    return json.dumps(body, sort_keys=True).encode()


def _refuse_non_empty(settings: Settings, conn: psycopg.Connection[Any], manifest: Manifest) -> None:
    if settings.partitions != manifest.partitions:
        raise ConfigurationError(
            f"the backup's topic has {manifest.partitions} partitions but EVP_PARTITIONS is {settings.partitions}: "
            f"streams would map to other partitions; set EVP_PARTITIONS={manifest.partitions}"
        )
    ends = end_offsets(settings, settings.events_topic)
    if any(ends.values()):
        raise EvpError(
            f"topic {settings.events_topic!r} is not empty (end offsets {dict(sorted(ends.items()))}): a restore writes "
            "only into an empty topic; choose a new EVP_TOPIC_PREFIX and a new database"
        )
    if ends and len(ends) != manifest.partitions:
        raise EvpError(f"topic {settings.events_topic!r} exists with {len(ends)} partitions; the backup needs {manifest.partitions}")
    row = conn.execute("SELECT count(*) FROM evp_events").fetchone()
    if row is not None and row[0]:
        raise EvpError(
            f"the ledger in {postgres.describe(settings.database_url)} already holds {row[0]} events: a restore rebuilds it "
            "only into an empty database; point EVP_DATABASE_URL at a new one"
        )


class _Chain:
    """The backups a restore reads (full backup first), as one stream of records per source."""

    def __init__(self, storage: Storage, manifests: list[Manifest]) -> None:
        self.storage, self.manifests = storage, manifests
        self.last = manifests[-1]
        self.where = storage.describe(self.last.name) + (f" (and the {len(manifests) - 1} backups it continues)"
                                                          if len(manifests) > 1 else "")

    def records(self, source: str) -> Iterator[BackupRecord]:
        """Every record of ``source`` in chain order; the state (reservations, snapshots) only from the newest."""
        pieces = self.manifests[-1:] if source in (RESERVATIONS, SNAPSHOTS) else self.manifests
        rank = SOURCES.index(source)
        for manifest in pieces:
            with BackupFile(self.storage, manifest.name) as backup:
                for record in backup.records():  # in canonical order: past the source, nothing of it follows
                    if record.source == source:
                        yield record
                    elif SOURCES.index(record.source) > rank:
                        break

    @property
    def events(self) -> int:
        return sum(m.records for m in self.manifests)


def _schema_records_to_write(chain: _Chain, settings: Settings, log: KafkaSchemaLog) -> list[tuple[bytes, bytes]]:
    """The chain's registry records not yet in the target's log; refuses a log holding anything else."""
    wanted = [(record.key or b"", retarget_schema_record(record.value or b"", chain.last.topic, settings.events_topic))
              for record in chain.records(SCHEMAS)]
    present = log.read_all()
    if present != wanted[:len(present)]:
        raise EvpError(
            f"the schema registry topic {settings.schemas_topic!r} already holds {len(present)} records that are not the "
            "backup's: restored schema ids would clash; choose a new EVP_TOPIC_PREFIX"
        )
    return wanted[len(present):]


@dataclass
class _Placement:
    """Where the restore put each event record, by its index within its partition."""

    offsets: dict[int, array[int]] = field(default_factory=dict)
    preserved: bool = True
    produced: int = 0


def _produce(chain: _Chain, settings: Settings, on_progress: OnProgress | None) -> _Placement:
    placement = _Placement({p: array("q") for p in chain.last.ranges})
    sender = producer(settings, linger_ms=20)
    pending: list[tuple[BackupRecord, Any]] = []

    def settle() -> None:
        with kafka_errors(settings):
            sender.flush()
            for record, future in pending:
                try:
                    offset = future.get(timeout=60).offset
                except Exception as err:  # noqa: BLE001 - any failed send fails the restore
                    raise EvpError(f"kafka did not acknowledge record {record.partition}@{record.offset}: {err}") from err
                placement.offsets[record.partition].append(offset)
                placement.preserved = placement.preserved and offset == record.offset
        placement.produced += len(pending)
        pending.clear()

    try:
        for record in reporting(chain.records(EVENTS), "produce", chain.events, on_progress):
            with kafka_errors(settings):
                future = sender.send(
                    settings.events_topic, key=record.key, value=record.value, partition=record.partition,
                    timestamp_ms=record.timestamp,
                    # kafka-python cannot send a null header value; evp never writes one
                    headers=[(k, v if v is not None else b"") for k, v in record.headers],
                )
            pending.append((record, future))
            if len(pending) >= PRODUCE_CHUNK:
                settle()
        settle()
    finally:
        sender.close()
    return placement


_STAGE = """
CREATE TEMP TABLE evp_restore (
    position bigint, stream_id text NOT NULL, version bigint NOT NULL, event_id uuid NOT NULL,
    event_type text NOT NULL, schema_id integer NOT NULL, value bytea NOT NULL, actor text NOT NULL,
    subject_id text, subject_ids text[] NOT NULL, occurred_at timestamptz NOT NULL, recorded_at timestamptz NOT NULL,
    partition integer NOT NULL, kafka_offset bigint NOT NULL, chain bytea
) ON COMMIT DROP
"""
_COLUMNS = ("position, stream_id, version, event_id, event_type, schema_id, value, actor, subject_id, subject_ids, "
            "occurred_at, recorded_at, partition, kafka_offset")
_STAGED = f"{_COLUMNS}, chain"
_SEQUENCE = "pg_get_serial_sequence('evp_events', 'position')"
_INSERT = f"""
INSERT INTO evp_events ({_COLUMNS})
SELECT DISTINCT ON (stream_id, version) coalesce(position, nextval({_SEQUENCE})), stream_id, version, event_id,
       event_type, schema_id, value, actor, subject_id, subject_ids, occurred_at, recorded_at, partition, kafka_offset
  FROM evp_restore ORDER BY stream_id, version, kafka_offset
"""


@dataclass(frozen=True)
class _LedgerRow:
    position: int | None
    stream_id: str
    version: int
    event_id: uuid.UUID
    event_type: str
    schema_id: int
    value: bytes
    actor: str
    subject_id: str | None
    subject_ids: list[str]
    occurred_at: datetime
    recorded_at: datetime
    partition: int
    kafka_offset: int
    chain: bytes | None  #: the record's link in its partition's hash chain

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name.strip()) for name in _STAGED.split(","))


class _RowBuilder:
    """Turns a record back into the ledger row the relay published it from."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec

    def row(self, record: BackupRecord, offset: int) -> _LedgerRow | None:
        """The row, or None for a record that evp did not write (no key or evp headers)."""
        headers = {k: v or b"" for k, v in record.headers}
        if record.key is None or record.value is None:
            return None
        try:
            stream_id = record.key.decode("utf-8")
            check_stream_id(stream_id)
            event_type = headers[HEADER_EVENT_TYPE].decode()
            actor = headers.get(HEADER_ACTOR, b"").decode()
            check_text(event_type, "actor", actor)
            position = headers.get(HEADER_POSITION)
            schema_id, _ = split_value(record.value)
            subject, subjects = self._subjects(record.value)
            return _LedgerRow(
                position=int(position.decode()) if position else None, stream_id=stream_id,
                version=int(headers[HEADER_STREAM_VERSION].decode()),
                event_id=uuid.UUID(headers[HEADER_EVENT_ID].decode()), event_type=event_type, schema_id=schema_id,
                value=record.value, actor=actor, subject_id=subject, subject_ids=subjects,
                occurred_at=datetime.fromisoformat(headers[HEADER_OCCURRED_AT].decode()),
                recorded_at=datetime.fromtimestamp(record.timestamp / 1000, UTC),
                partition=record.partition, kafka_offset=offset, chain=link_header(list(headers.items())),
            )
        except (KeyError, ValueError, UnicodeDecodeError, DecodeError, InvalidEvent):
            return None

    def _subjects(self, value: bytes) -> tuple[str | None, list[str]]:
        """The record's subject and every subject it concerns, as the SDK derived them.

        Read from the policy of the schema the event was written with, so a restore needs
        no project code.
        """
        try:
            decoded = self._codec.decode(value)
        except DecodeError:
            return None, []
        policy = decoded.policy
        subject = decoded.datum.get(policy.subject_field) if policy.subject_field else None
        subjects = [s for s in policy.subjects(decoded.datum) if "\x00" not in s]
        return (subject if isinstance(subject, str) and "\x00" not in subject else None), subjects


@dataclass(frozen=True)
class _LedgerOutcome:
    written: int
    staged: int
    foreign: int
    streams: int
    erasures: tuple[str, ...]
    incomplete: tuple[str, ...]
    state: dict[str, int]


_PUBLISHED = """
INSERT INTO evp_published (position, kafka_offset, chain)
SELECT e.position, e.kafka_offset, r.chain FROM evp_events e
  JOIN evp_restore r ON r.stream_id = e.stream_id AND r.version = e.version AND r.kafka_offset = e.kafka_offset
 WHERE r.chain IS NOT NULL
"""


def _rebuild_ledger(
    conn: psycopg.Connection[Any], chain: _Chain, placement: _Placement, builder: _RowBuilder,
    keys: KeyStore, erasure_type: str, on_progress: OnProgress | None,
) -> _LedgerOutcome:
    staged = foreign = 0
    erased: set[str] = set()
    heads: dict[int, tuple[int, bytes]] = {}  #: partition -> (offset, link) of its last chained record
    with conn.transaction():
        conn.execute(_STAGE)
        with conn.cursor() as cur, cur.copy(f"COPY evp_restore ({_STAGED}) FROM STDIN") as copy:
            index = {p: 0 for p in chain.last.ranges}
            for record in reporting(chain.records(EVENTS), "ledger", chain.events, on_progress):
                offset = placement.offsets[record.partition][index[record.partition]]
                index[record.partition] += 1
                claimed = link_header([(k, v or b"") for k, v in record.headers])
                if claimed:
                    heads[record.partition] = (offset, claimed)
                row = builder.row(record, offset)
                if row is None:
                    foreign += 1
                    continue
                copy.write_row(row.as_tuple())
                staged += 1
                if row.event_type == erasure_type and row.subject_id:
                    erased.add(row.subject_id)
        _check_consistent(conn, chain.where)
        for subject in sorted(erased):  # before the commit: an erasure in the log holds once the events are back
            keys.erase(subject)
        conn.execute(f"SELECT setval({_SEQUENCE}, (SELECT coalesce(max(position), 0) + 1 FROM evp_restore), false)")
        try:
            written = conn.execute(_INSERT).rowcount
        except psycopg.errors.UniqueViolation as err:
            raise IntegrityError(f"backup {chain.where}: two events claim one ledger position: {err.diag.message_detail}") from err
        conn.execute(f"SELECT setval({_SEQUENCE}, (SELECT coalesce(max(position), 0) + 1 FROM evp_events), false)")
        conn.execute(_PUBLISHED)
        for partition, (offset, link) in sorted(heads.items()):  # where the restored relays go on chaining
            conn.execute("INSERT INTO evp_chain_heads (partition, kafka_offset, chain) VALUES (%s, %s, %s)",
                         (partition, offset, link))
        streams = conn.execute(
            "INSERT INTO evp_streams (stream_id, version) SELECT stream_id, max(version) FROM evp_events GROUP BY stream_id"
            " ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, updated_at = now()"
        ).rowcount
        incomplete = conn.execute(
            "SELECT stream_id FROM evp_events GROUP BY stream_id HAVING min(version) <> 1 OR max(version) <> count(*)"
            " ORDER BY stream_id"
        ).fetchall()
        state = _restore_state(conn, chain, erased)
    return _LedgerOutcome(written, staged, foreign, streams, tuple(sorted(erased)), tuple(r[0] for r in incomplete), state)


def _restore_state(conn: psycopg.Connection[Any], chain: _Chain, erased: set[str]) -> dict[str, int]:
    """Step 5: the newest backup's reservations (but an erased subject's) and aggregate snapshots."""
    restored = {RESERVATIONS: 0, SNAPSHOTS: 0}
    for record in chain.records(RESERVATIONS):
        scope, value = json.loads(record.key or b"null")
        row = json.loads(record.value or b"null")
        if row.get("subject_id") in erased:
            continue
        conn.execute("INSERT INTO evp_reservations (scope, value, stream_id, reserved_at, subject_id)"
                     " VALUES (%s, %s, %s, %s, %s)",
                     (scope, value, row["stream_id"], _at(record.timestamp), row.get("subject_id")))
        restored[RESERVATIONS] += 1
    for record in chain.records(SNAPSHOTS):
        stream_id, version = json.loads(record.key or b"null")
        row = json.loads(record.value or b"null")
        conn.execute("INSERT INTO evp_aggregate_snapshots (stream_id, version, state, taken_at) VALUES (%s, %s, %s, %s)",
                     (stream_id, version, Jsonb(row["state"]), _at(record.timestamp)))
        restored[SNAPSHOTS] += 1
    return restored


def _at(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


def _check_consistent(conn: psycopg.Connection[Any], where: str) -> None:
    """Duplicates must be true re-sends: one event id per (stream, version), one place per event id."""
    clash = conn.execute(
        "SELECT stream_id, version FROM evp_restore GROUP BY stream_id, version HAVING count(DISTINCT event_id) > 1 LIMIT 1"
    ).fetchone()
    if clash is not None:
        raise IntegrityError(f"backup {where}: stream {clash[0]!r} version {clash[1]} holds two different events")
    moved = conn.execute(
        "SELECT event_id FROM evp_restore GROUP BY event_id HAVING count(DISTINCT (stream_id, version)) > 1 LIMIT 1"
    ).fetchone()
    if moved is not None:
        raise IntegrityError(f"backup {where}: event {moved[0]} appears at two different stream positions")


def _restored_heads(settings: Settings, chain: _Chain, placement: _Placement) -> dict[int, str | None]:
    """Step 6: the restored topic re-read from Kafka, its chains followed to their heads."""
    ranges = {p: (min(o), max(o) + 1) for p, o in placement.offsets.items() if o}
    walk = Walk()
    for partition, (start, _) in chain.manifests[0].ranges.items():
        if start > 0:  # the chain began before the full backup (retention): its first link is taken as it is
            walk.resync(partition)
    heads: dict[int, str | None] = {p: None for p in chain.last.ranges}
    for message in read_pinned(settings, settings.events_topic, ranges):
        what, claimed, _ = walk.step(message.partition, message.key, message.value, message.headers or [])
        if claimed is not None and what in (FOLLOWS, RESENT):
            heads[message.partition] = claimed.hex()
        elif claimed is not None:
            heads[message.partition] = f"broken at offset {message.offset}"
    return heads


def restore_backup(
    location: str | Path, settings: Settings, *, keys: KeyStore | None = None, on_progress: OnProgress | None = None,
    backup_key: BackupKey | None = None, sequence: int | None = None,
    providers: Mapping[str, ProofProvider] | None = None,
) -> RestoreReport:
    """Restore the backup chain ending at ``sequence`` (default: the newest) at ``location`` into the services of
    ``settings``; see the module docstring for the contract.

    ``keys`` is a live key store to copy wrapped data keys and tombstones from (the restored
    ledger's database holds the target key store); without it, personal fields decrypt only
    where the target's key store already holds their keys. ``backup_key`` authenticates the
    backups; by default it is the backup key of ``settings`` (which must exist: copy
    ``backup.key`` with the KEK when restoring elsewhere). ``providers`` prove the restore
    equal (default: the installed :func:`~events.ops.backup_set.proof_providers`).
    """
    storage = Storage(location)
    mac_key = backup_key if backup_key is not None else BackupKey.from_settings(settings)
    chain = _Chain(storage, verify_chain(storage, chain_to(storage, sequence), mac_key, on_progress=on_progress))
    catalog = Catalog.platform()  # events are read with the schemas they were written with
    conn = postgres.connect(settings.database_url, autocommit=True)
    target_keys = PostgresKeyStore(settings.keyring_url)
    try:
        postgres.migrate(conn)
        _refuse_non_empty(settings, conn, chain.last)
        schema_log = KafkaSchemaLog(settings)
        try:
            schemas = _schema_records_to_write(chain, settings, schema_log)
            target_keys.ensure_schema()
            copied = copy_keys(keys, target_keys) if keys is not None else 0
            for key, value in schemas:
                schema_log.append(key, value)
            ensure_event_topics(settings)
            placement = _produce(chain, settings, on_progress)
            builder = _RowBuilder(Codec(SchemaRegistry(schema_log), catalog, settings.events_topic))
            outcome = _rebuild_ledger(conn, chain, placement, builder, target_keys,
                                      catalog.full_name("SubjectForgotten"), on_progress)
        finally:
            schema_log.close()
    finally:
        target_keys.close()
        conn.close()
    heads = _restored_heads(settings, chain, placement)
    recorded = {p: h for p, h in chain.last.chain_heads.items()}
    checks = [ProofCheck("chain", f"partition {p}", str(recorded.get(p)), str(heads.get(p)))
              for p in sorted(recorded)] if chain.last.format_version >= 3 else []
    for name, provider in (proof_providers() if providers is None else providers).items():
        if name in chain.last.proofs:
            checks += provider.check(settings, chain.last.proofs[name])
    report = RestoreReport(
        topic=settings.events_topic, records=placement.produced, schema_records=len(schemas),
        ledger_events=outcome.written, duplicates=outcome.staged - outcome.written, foreign=outcome.foreign,
        streams=outcome.streams, offsets_preserved=placement.preserved, keys_copied=copied,
        erasures_applied=outcome.erasures, incomplete_streams=outcome.incomplete,
        backups=tuple(m.sequence for m in chain.manifests), position=chain.last.position,
        reservations=outcome.state[RESERVATIONS], snapshots=outcome.state[SNAPSHOTS], proofs=tuple(checks),
    )
    return report
