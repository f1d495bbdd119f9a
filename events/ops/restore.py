"""Restoring a backup (see :mod:`events.ops.backup`) into empty services.

Contract of :func:`restore_backup` (into the *current* settings, typically a new topic
prefix and a new database):

1. authenticate and verify the whole file first (its MAC under the backup key of
   ``settings``, or ``backup_key``); refuse unless the target's events topic and ledger are
   empty and its schema registry holds nothing but (a prefix of) the backup's schemas;
2. copy wrapped data keys and tombstones from a live key store, when one is given;
3. append the schema records (same ids; subjects renamed to the target topic);
4. produce every event record with its key, headers, value and timestamp to its partition,
   in offset order, with the idempotent producer, and wait for every acknowledgement;
5. in one PostgreSQL transaction rebuild the ledger from the records — one row per
   ``(stream, version)`` (relay duplicates skipped), with the new Kafka offsets and no outbox
   rows — and the streams' versions. Erasures recorded in the log are applied to the
   target's key store, so a key copied from an older key backup cannot undo them.

A restore that dies halfway leaves a non-empty topic, so a rerun refuses: restore again
under a new topic prefix and into a new database (or delete the half-restored ones).
"""

from __future__ import annotations

import json
import uuid
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

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
from events.store.log import end_offsets
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.ops.backup import (
    EVENTS,
    PRODUCE_CHUNK,
    SCHEMAS,
    BackupFile,
    BackupKey,
    BackupRecord,
    Manifest,
    OnProgress,
    reporting,
    verify_backup,
)
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

    def __str__(self) -> str:
        offsets = "offsets preserved" if self.offsets_preserved else "offsets shifted (the backup did not start at offset 0)"
        return (f"restored {self.records} records to {self.topic} ({offsets}), {self.schema_records} schema records, "
                f"{self.ledger_events} ledger events in {self.streams} streams ({self.duplicates} relay duplicates "
                f"skipped, {self.foreign} foreign records left out of the ledger), {self.keys_copied} keys copied, "
                f"{len(self.erasures_applied)} erasures applied")


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


def _schema_records_to_write(path: Path, manifest: Manifest, settings: Settings, log: KafkaSchemaLog) -> list[tuple[bytes, bytes]]:
    """The backup's registry records not yet in the target's log; refuses a log holding anything else."""
    wanted: list[tuple[bytes, bytes]] = []
    with BackupFile(path) as backup:
        for record in backup.records():
            if record.source != SCHEMAS:
                break  # schema records come first
            value = retarget_schema_record(record.value or b"", manifest.topic, settings.events_topic)
            wanted.append((record.key or b"", value))
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


def _produce(path: Path, settings: Settings, manifest: Manifest, on_progress: OnProgress | None) -> _Placement:
    placement = _Placement({p: array("q") for p in manifest.ranges})
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
        with BackupFile(path) as backup:
            events = (r for r in backup.records() if r.source == EVENTS)
            for record in reporting(events, "produce", manifest.records, on_progress):
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
    partition integer NOT NULL, kafka_offset bigint NOT NULL
) ON COMMIT DROP
"""
_COLUMNS = ("position, stream_id, version, event_id, event_type, schema_id, value, actor, subject_id, subject_ids, "
            "occurred_at, recorded_at, partition, kafka_offset")
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

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name.strip()) for name in _COLUMNS.split(","))


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
                partition=record.partition, kafka_offset=offset,
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


def _rebuild_ledger(
    conn: psycopg.Connection[Any], path: Path, manifest: Manifest, placement: _Placement, builder: _RowBuilder,
    keys: KeyStore, erasure_type: str, on_progress: OnProgress | None,
) -> _LedgerOutcome:
    staged = foreign = 0
    erased: set[str] = set()
    with conn.transaction():
        conn.execute(_STAGE)
        with conn.cursor() as cur, cur.copy(f"COPY evp_restore ({_COLUMNS}) FROM STDIN") as copy, BackupFile(path) as backup:
            index = {p: 0 for p in manifest.ranges}
            events = (r for r in backup.records() if r.source == EVENTS)
            for record in reporting(events, "ledger", manifest.records, on_progress):
                offset = placement.offsets[record.partition][index[record.partition]]
                index[record.partition] += 1
                row = builder.row(record, offset)
                if row is None:
                    foreign += 1
                    continue
                copy.write_row(row.as_tuple())
                staged += 1
                if row.event_type == erasure_type and row.subject_id:
                    erased.add(row.subject_id)
        _check_consistent(conn, path)
        for subject in sorted(erased):  # before the commit: an erasure in the log holds once the events are back
            keys.erase(subject)
        conn.execute(f"SELECT setval({_SEQUENCE}, (SELECT coalesce(max(position), 0) + 1 FROM evp_restore), false)")
        try:
            written = conn.execute(_INSERT).rowcount
        except psycopg.errors.UniqueViolation as err:
            raise IntegrityError(f"backup {path}: two events claim one ledger position: {err.diag.message_detail}") from err
        conn.execute(f"SELECT setval({_SEQUENCE}, (SELECT coalesce(max(position), 0) + 1 FROM evp_events), false)")
        streams = conn.execute(
            "INSERT INTO evp_streams (stream_id, version) SELECT stream_id, max(version) FROM evp_events GROUP BY stream_id"
            " ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, updated_at = now()"
        ).rowcount
        incomplete = conn.execute(
            "SELECT stream_id FROM evp_events GROUP BY stream_id HAVING min(version) <> 1 OR max(version) <> count(*)"
            " ORDER BY stream_id"
        ).fetchall()
    return _LedgerOutcome(written, staged, foreign, streams, tuple(sorted(erased)), tuple(r[0] for r in incomplete))


def _check_consistent(conn: psycopg.Connection[Any], path: Path) -> None:
    """Duplicates must be true re-sends: one event id per (stream, version), one place per event id."""
    clash = conn.execute(
        "SELECT stream_id, version FROM evp_restore GROUP BY stream_id, version HAVING count(DISTINCT event_id) > 1 LIMIT 1"
    ).fetchone()
    if clash is not None:
        raise IntegrityError(f"backup {path}: stream {clash[0]!r} version {clash[1]} holds two different events")
    moved = conn.execute(
        "SELECT event_id FROM evp_restore GROUP BY event_id HAVING count(DISTINCT (stream_id, version)) > 1 LIMIT 1"
    ).fetchone()
    if moved is not None:
        raise IntegrityError(f"backup {path}: event {moved[0]} appears at two different stream positions")


def restore_backup(
    path: Path | str, settings: Settings, *, keys: KeyStore | None = None, on_progress: OnProgress | None = None,
    backup_key: BackupKey | None = None,
) -> RestoreReport:
    """Restore a backup into the services of ``settings``; see the module docstring for the contract.

    ``keys`` is a live key store to copy wrapped data keys and tombstones from (the restored
    ledger's database holds the target key store); without it, personal fields decrypt only
    where the target's key store already holds their keys. ``backup_key`` authenticates the
    backup; by default it is the backup key of ``settings`` (which must exist: copy
    ``backup.key`` with the KEK when restoring elsewhere).
    """
    path = Path(path)
    mac_key = backup_key if backup_key is not None else BackupKey.from_settings(settings)
    manifest = verify_backup(path, mac_key, on_progress=on_progress)
    catalog = Catalog.platform()  # events are read with the schemas they were written with
    conn = postgres.connect(settings.database_url, autocommit=True)
    target_keys = PostgresKeyStore(settings.keyring_url)
    try:
        postgres.migrate(conn)
        _refuse_non_empty(settings, conn, manifest)
        schema_log = KafkaSchemaLog(settings)
        try:
            schemas = _schema_records_to_write(path, manifest, settings, schema_log)
            target_keys.ensure_schema()
            copied = copy_keys(keys, target_keys) if keys is not None else 0
            for key, value in schemas:
                schema_log.append(key, value)
            ensure_event_topics(settings)
            placement = _produce(path, settings, manifest, on_progress)
            builder = _RowBuilder(Codec(SchemaRegistry(schema_log), catalog, settings.events_topic))
            outcome = _rebuild_ledger(conn, path, manifest, placement, builder, target_keys,
                                      catalog.full_name("SubjectForgotten"), on_progress)
        finally:
            schema_log.close()
    finally:
        target_keys.close()
        conn.close()
    return RestoreReport(
        topic=settings.events_topic, records=placement.produced, schema_records=len(schemas),
        ledger_events=outcome.written, duplicates=outcome.staged - outcome.written, foreign=outcome.foreign,
        streams=outcome.streams, offsets_preserved=placement.preserved, keys_copied=copied,
        erasures_applied=outcome.erasures, incomplete_streams=outcome.incomplete,
    )
