"""The exactly-once consumer loop, and the projection runner built on it.

:class:`LogConsumer` is the loop every consumer of the log shares (views, the saga
coordinator, saga participants): it owns a schema of its own, and its positions live in
that schema. Contract of one batch (one ``poll``):

1. in ONE PostgreSQL transaction, under an advisory lock on the consumer's schema, it
   checks that the stored positions are the ones it started the batch from (another runner
   or a rebuild swap may have moved them: then it re-seeks and polls again);
2. records that do not decode go to the dead-letter topic, and so do records that decode
   but are not well-formed records of the topic (:meth:`LogConsumer.malformed`: a stream
   version below 1, an empty key, a schema registered for another topic); records whose
   stream version is at or below the version already applied to that stream are skipped (a
   relay re-publishes after a crash, so the same (stream, version) can appear twice), unless
   their content differs from the record that took that (stream, version) (its value, event
   id, actor and time: :func:`record_identity`, kept per record in ``evp_stream_records``):
   such a *conflicting duplicate* is dead-lettered, never silently dropped;
3. the rest are applied, the whole batch at once (:meth:`LogConsumer.apply` — for a view,
   :func:`projections.tables.apply`): records the consumer refuses are dead-lettered; if
   the database refuses a value (a poison record, see
   :data:`projections.deadletter.POISON_ERRORS`), the batch is split in halves, each
   applied in a savepoint, down to the single records refused, which are dead-lettered
   (one poison record in a batch of n costs about 2·log2(n) applies, not n);
4. dead letters are flushed to Kafka, then the effects, the applied stream versions
   (``evp_stream_versions``), each new record's identity and whether it was refused
   (``evp_stream_records``) and the next offsets (``evp_offsets``) commit together.

A crash anywhere before the commit leaves the effects and the positions as they were, so the
batch is simply read again: effects are applied exactly once. Positions live only in
PostgreSQL (partitions are assigned by hand, no consumer-group commits), so the view and
its position can never disagree. :class:`ProjectionRunner` is the loop for one declared view.
:meth:`LogConsumer.catch_up_to` stops at a :class:`~events.store.cut.Cut` instead of the
topic's end (a view as it was, :func:`projections.rebuild.rebuild_as_of`).
:meth:`LogConsumer.replay` re-drives dead-lettered records (``evp projections dlq replay``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import psycopg
from kafka import KafkaConsumer, TopicPartition
from psycopg import sql

from events import faults
from events.adapters import postgres
from events.adapters.retry import run_until_stopped
from events.schema.catalog import Catalog
from events.schema.codec import Codec
from events.errors import ConfigurationError, SchemaError, ServiceUnavailable
from events.adapters.kafka import consumer as make_consumer, ensure_event_topics, kafka_errors, where
from events.event import HEADER_EVENT_TYPE, HEADER_STREAM_VERSION
from events.gc_pause import gc_paused
from events.store.client import EventStore
from events.store.cut import Cut
from events.store.log import BadRecord, LogRecord, decode_record, end_offsets
from events.store.source import Batch, InlineSource, PrefetchSource, open_codec
from events.settings import Settings
from projections import tables
from projections.deadletter import (
    POISON_ERRORS, STAGE_APPLY, STAGE_CONFLICT, STAGE_DECODE, DeadLetterQueue, describe_error,
)
from projections.fold import Refusal
from projections.leases import PartitionLeases, lease_class
from projections.view import FORGOTTEN, Layout, View

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5000
#: How often a scaled-out consumer looks at its leases again (between batches).
REBALANCE_EVERY_S = 1.0
#: How long a catch-up waits for records it knows exist before calling the broker unavailable.
STALL_TIMEOUT_S = 30.0


# -- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchOutcome:
    """What one batch did."""

    applied: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    beyond_cut: int = 0  #: records below a cut's ends that the cut does not admit (:meth:`LogConsumer.catch_up_to`)

    def __add__(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(
            self.applied + other.applied, self.skipped + other.skipped, self.dead_lettered + other.dead_lettered,
            self.beyond_cut + other.beyond_cut,
        )


@dataclass(frozen=True)
class CatchUpResult:
    """A catch-up: records applied, skipped as duplicates, dead-lettered, and wall time."""

    applied: int
    skipped: int
    dead_lettered: int
    seconds: float


@dataclass(frozen=True)
class CutCatchUp(CatchUpResult):
    """A catch-up that stopped at ``cut``: also the records below its ends that it did not admit
    (a relay's re-send of a later position), skipped and counted apart from the duplicates."""

    cut: Cut
    beyond_cut: int


@dataclass(frozen=True)
class Progress:
    """Passed to a catch-up's progress callback after every batch."""

    consumed: int  #: offsets passed since the catch-up started
    total: int  #: offsets between the start positions and the end offsets taken at the start
    outcome: BatchOutcome  #: totals so far


#: What a replay did with one dead-lettered record (:meth:`LogConsumer.replay`).
REPLAY_APPLIED = "applied"  #: it applied now
REPLAY_DUPLICATE = "duplicate"  #: the same record was applied already: nothing done
REPLAY_FAILED = "failed"  #: refused or undecodable again: a new letter
REPLAY_CONFLICT = "conflict"  #: its (stream, version) holds a record with other content: a new letter


@dataclass(frozen=True)
class Replayed:
    """One record of a replay: where it came from, what happened, and why when it failed."""

    partition: int
    offset: int
    outcome: str
    reason: str = ""


@dataclass(frozen=True)
class ReplayOutcome:
    """A replay: one :class:`Replayed` per record, in the order given."""

    records: tuple[Replayed, ...]

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.records if r.outcome == outcome)


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    next_offset: int | None  #: None: the projection has not read this partition yet
    end_offset: int

    @property
    def lag(self) -> int:
        return self.end_offset - (self.next_offset or 0)


# -- pure helpers --------------------------------------------------------------------------
def select_new(records: Iterable[LogRecord], applied: Mapping[str, int]) -> tuple[list[LogRecord], dict[str, int]]:
    """The records above their stream's applied version, in order, and the versions they reach.

    ``applied`` maps stream id to the highest version already applied. A record at or below
    it (or below one met earlier in ``records``) is a duplicate.
    """
    latest: dict[str, int] = {}
    new: list[LogRecord] = []
    for record in records:
        seen = latest.get(record.stream_id, applied.get(record.stream_id, 0))
        if record.version > seen:
            latest[record.stream_id] = record.version
            new.append(record)
    return new, latest


def record_identity(message: Any, record: LogRecord) -> bytes:
    """What makes two copies of a (stream, version) the same record: its value and the evp headers a
    view reads (event id, actor, time), length-prefixed, SHA-256, first 16 bytes.

    A relay's re-send repeats all of them; a record with other content under the same key
    and version headers (a forgery, a second writer) differs.
    """
    digest = hashlib.sha256()
    for part in (message.value or b"", record.event_id.bytes, record.actor.encode(), record.occurred_at.encode()):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()[:16]


# -- bookkeeping tables --------------------------------------------------------------------
def view_lock(schema: str, *, shared: bool = False) -> sql.Composed:
    """Serialises batches, schema creation and swaps of one view across processes (shared: scaled-out batches)."""
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    return sql.SQL("SELECT {}(hashtext({}))").format(sql.SQL(function), sql.Literal(f"evp.projection:{schema}"))


def batch_class(schema: str) -> int:
    """The advisory-lock class of a scaled-out batch's partition locks (apart from the leases' class)."""
    return lease_class(schema) ^ 1


def ensure_schema(conn: psycopg.Connection[Any], schema: str, owner: str,
                  create: Callable[[psycopg.Cursor[Any]], None]) -> None:
    """Create the schema, the loop's bookkeeping tables and the consumer's own (``create``), idempotently.

    ``owner`` names the consumer the schema belongs to (a view's name, a saga
    coordinator's); ConfigurationError when the schema already belongs to another.
    """
    s = sql.Identifier(schema)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(view_lock(schema))
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.evp_projection (name text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now())"
        ).format(s))
        cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.evp_offsets (topic text NOT NULL, partition integer NOT NULL,"
            " next_offset bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (topic, partition))"
        ).format(s))
        cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.evp_stream_versions (stream_id text PRIMARY KEY, version bigint NOT NULL)"
        ).format(s))
        cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.evp_stream_records (stream_id text NOT NULL, version bigint NOT NULL,"
            " identity bytea NOT NULL, refused boolean NOT NULL, PRIMARY KEY (stream_id, version))"
        ).format(s))
        owners = [r[0] for r in cur.execute(sql.SQL("SELECT name FROM {}.evp_projection").format(s))]
        if not owners:
            cur.execute(sql.SQL("INSERT INTO {}.evp_projection (name) VALUES (%s)").format(s), (owner,))
        elif owners != [owner]:
            raise ConfigurationError(f"schema {schema!r} holds {owners[0]!r}, not {owner!r}")
        create(cur)


def stored_records(cur: psycopg.Cursor[Any], schema: str,
                   keys: set[tuple[str, int]]) -> dict[tuple[str, int], tuple[bytes, bool]]:
    """(stream, version) -> (identity, refused) of the records ``evp_stream_records`` holds for ``keys``."""
    if not keys:
        return {}
    streams, versions = zip(*sorted(keys))
    rows = cur.execute(
        sql.SQL("SELECT r.stream_id, r.version, r.identity, r.refused FROM {}.evp_stream_records r"
                " JOIN unnest(%s::text[], %s::bigint[]) AS k(stream_id, version) USING (stream_id, version)").format(
            sql.Identifier(schema)),
        (list(streams), list(versions)),
    ).fetchall()
    return {(s, int(v)): (bytes(i), bool(refused)) for s, v, i, refused in rows}


def applied_since(settings: Settings, schema: str, codec: Codec, messages: Sequence[Any]) -> set[tuple[int, int]]:
    """The (partition, offset) of dead-lettered records (``messages``, as the runner read them) that the
    view in ``schema`` has applied since with the same identity (a replay, or a re-send read later).
    Reads only: a schema that does not exist yet has applied none."""
    records = [(m, r) for m in messages if isinstance(r := decode_record(codec, m), LogRecord)]
    with postgres.connect(settings.database_url, autocommit=True) as conn, conn.cursor() as cur:
        if cur.execute("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'evp_stream_records'",
                       (schema,)).fetchone() is None:
            return set()
        stored = stored_records(cur, schema, {(r.stream_id, r.version) for _, r in records})
    return {(r.partition, r.offset) for m, r in records
            if stored.get((r.stream_id, r.version)) == (record_identity(m, r), False)}


def ensure_view_schema(conn: psycopg.Connection[Any], layout: Layout) -> None:
    """:func:`ensure_schema` for a view's layout (its bookkeeping and its tables)."""
    ensure_schema(conn, layout.schema, layout.view, lambda cur: tables.create(cur, layout))


def stored_offsets(cur: psycopg.Cursor[Any], schema: str, topic: str) -> dict[int, int]:
    """partition -> next offset to read, as committed with the view."""
    rows = cur.execute(
        sql.SQL("SELECT partition, next_offset FROM {}.evp_offsets WHERE topic = %s").format(sql.Identifier(schema)),
        (topic,),
    ).fetchall()
    return {int(p): int(o) for p, o in rows}


class _PositionsMoved(Exception):
    """The stored positions are not the ones this runner read from: re-seek, poll again."""


# -- the runner ----------------------------------------------------------------------------
class LogConsumer:
    """The exactly-once loop over the events topic (the contract in the module docstring).

    A subclass names its ``owner`` and ``schema`` and implements :meth:`create_tables` and
    :meth:`apply`; the loop does the positions, the locking, the dedupe by stream version,
    the dead letters and the retries. ``catalog`` (default: the project's, see
    :func:`events.project.catalog_for`) decides which current schemas old records are
    read with.

    Not thread-safe: one thread drives a consumer. Several consumers (or processes) may
    serve the same schema; the advisory lock and the position check keep effects single.
    """

    def __init__(
        self,
        settings: Settings,
        owner: str,
        schema: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        codec: Codec | None = None,
        catalog: Catalog | None = None,
        scale_out: bool = False,
        prefetch: bool = False,
    ) -> None:
        self.settings, self.owner, self.schema = settings, owner, schema
        #: Fetch and decode in a process of their own, one batch ahead (:mod:`events.store.source`).
        self.prefetch = prefetch
        #: With scale_out, consumers of one schema share the partitions (:mod:`projections.leases`).
        self.leases = PartitionLeases(settings, schema) if scale_out else None
        self._rebalanced_at = 0.0
        self._catalog = catalog
        self.topic = settings.events_topic
        self.batch_size = batch_size
        self._codec = codec
        self._conn: psycopg.Connection[Any] | None = None
        self._consumer: KafkaConsumer | None = None  #: metadata; also the fetcher of an inline source
        self._source: InlineSource | PrefetchSource | None = None
        self._positions: dict[int, int] = {}
        self._partitions: list[TopicPartition] = []
        self._topic_partitions: list[int] = []
        self._expected: dict[int, int] = {}
        self._dead_letters = DeadLetterQueue(settings, owner)
        self._cut: Cut | None = None  #: while :meth:`catch_up_to` runs: the cut it stops at
        self._subjects: dict[int, str | None] = {}  #: schema id -> why it is not of the topic (None: it is)

    # -- what a consumer does -------------------------------------------------------------
    def create_tables(self, cur: psycopg.Cursor[Any]) -> None:
        """Create the consumer's own tables in :attr:`schema` (idempotent; runs under the schema's lock)."""
        raise NotImplementedError

    def apply(self, cur: psycopg.Cursor[Any], records: Sequence[LogRecord]) -> list[Refusal]:
        """Apply new records (duplicates already dropped) inside the batch's transaction.

        Returns the records refused as bad input (they are dead-lettered); raising one of
        :data:`~projections.deadletter.POISON_ERRORS` makes the loop retry record by record.
        """
        raise NotImplementedError

    # -- connections ----------------------------------------------------------------------
    def open(self) -> None:
        """Connect, create the schema and seek to the stored positions (idempotent)."""
        self._open_database()
        if self._codec is None and not self.prefetch:
            self._codec = open_codec(self.settings, self._catalog)
        if self._consumer is None:
            ensure_event_topics(self.settings)
            self._consumer = make_consumer(self.settings, max_poll_records=self.batch_size, fetch_max_wait_ms=200)
            with kafka_errors(self.settings):
                found = self._consumer.partitions_for_topic(self.topic)
                if not found:
                    raise ServiceUnavailable("kafka", where(self.settings), f"topic {self.topic!r} has no partitions")
                self._topic_partitions = sorted(found)
                self._partitions = [TopicPartition(self.topic, p) for p in self._held(force=True)]
            if self.prefetch:
                self._source = PrefetchSource(self.settings, self._catalog, self.batch_size)
            else:
                assert self._codec is not None
                self._source = InlineSource(self.settings, self._consumer, self._codec, self.batch_size)
            self._seek_to_stored()

    def _open_database(self) -> psycopg.Connection[Any]:
        """Connect and create the schema (idempotent); a new connection drops the Kafka side too."""
        if self._conn is None or self._conn.closed:
            self._reset()  # positions come from the database: a new connection means a new seek
            self._conn = postgres.connect(self.settings.database_url, autocommit=True)
            ensure_schema(self._conn, self.schema, self.owner, self.create_tables)
        return self._conn

    def _decoder(self) -> Codec:
        """The consumer's codec (also when a prefetch process decodes: for replays and the subject check)."""
        if self._codec is None:
            self._codec = open_codec(self.settings, self._catalog)
        return self._codec

    def _held(self, *, force: bool = False) -> list[int]:
        """The partitions this consumer reads: all of them, or (scaling out) those it leases now."""
        if self.leases is None:
            return list(self._topic_partitions)
        if force or time.monotonic() - self._rebalanced_at >= REBALANCE_EVERY_S:
            self._rebalanced_at = time.monotonic()
            return sorted(self.leases.rebalance(self._topic_partitions))
        return sorted(self.leases.held)

    def rebalance(self, *, force: bool = False) -> None:
        """Between batches: follow the leases (at most every REBALANCE_EVERY_S unless ``force``).

        A partition taken over starts at the offset its last holder committed.
        """
        if self.leases is None or self._consumer is None:
            return
        mine = self._held(force=force)
        if mine != [tp.partition for tp in self._partitions]:
            log.info("%s: now reading partitions %s of %s", self.owner, mine, self.topic)
            self._partitions = [TopicPartition(self.topic, p) for p in mine]
            self._seek_to_stored()

    def _seek_to_stored(self) -> None:
        """Point the source at the committed positions of this consumer's partitions."""
        assert self._conn is not None and self._source is not None
        with self._conn.cursor() as cur:
            self._expected = self._own(stored_offsets(cur, self.schema, self.topic))
        self._positions = self._source.assign({tp.partition: self._expected.get(tp.partition) for tp in self._partitions})

    def _own(self, offsets: Mapping[int, int]) -> dict[int, int]:
        mine = {tp.partition for tp in self._partitions}
        return {p: o for p, o in offsets.items() if p in mine}

    def close(self) -> None:
        """Release the consumer, the producer, the leases and the connection; the position is in the view."""
        if self.leases is not None:
            self.leases.close()
        self._dead_letters.close()
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _reset(self) -> None:
        """Drop connections after a failure; the next :meth:`open` re-seeks from the view."""
        self._dead_letters.discard()
        for closer in (self._source, self._consumer, self._conn, self.leases):
            try:
                if closer is not None:
                    closer.close()
            except Exception:  # noqa: BLE001 - it is already broken
                pass
        self._source = self._consumer = None
        self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------
    def _poll(self, timeout_ms: int) -> Batch:
        """One batch from the source (:mod:`events.store.source`), decoded; the positions move past it."""
        assert self._source is not None
        batch = self._source.poll(timeout_ms)
        self._positions.update(batch.positions)
        return batch

    def _next_batch(self, timeout_ms: int) -> BatchOutcome | None:
        """Poll and apply one batch with the collector paused (a batch allocates many small
        containers, see :mod:`events.gc_pause`); None when the poll brought nothing."""
        with gc_paused():
            batch = self._poll(timeout_ms)
            if self._cut is not None:
                batch = _below(batch, self._cut.ends)
            return self.process(batch) if batch.messages else None

    def positions(self) -> dict[int, int]:
        """Where the consumer will read next, per partition."""
        return dict(self._positions)

    # -- one batch ------------------------------------------------------------------------
    def process(self, batch: Batch) -> BatchOutcome:
        """Apply one polled batch and commit it with its positions (the contract above)."""
        messages = batch.messages
        conn = self._conn
        assert conn is not None
        try:
            with conn.transaction(), conn.cursor() as cur:
                self._lock(cur, batch)
                if self._own(stored_offsets(cur, self.schema, self.topic)) != self._expected:
                    raise _PositionsMoved()
                outcome = self._apply_batch(cur, batch)
                self._dead_letters.flush()
                nexts = self._save_offsets(cur, messages)
        except _PositionsMoved:
            log.info("%s: positions in %s moved under this consumer; re-seeking", self.owner, self.schema)
            self._seek_to_stored()
            return BatchOutcome()
        except BaseException:
            self._reset()  # the consumer is past what committed: re-seek on the next open()
            raise
        self._expected.update(nexts)
        faults.reach(faults.VIEW_COMMITTED, schema=self.schema, offsets=nexts, applied=outcome.applied)
        return outcome

    def _lock(self, cur: psycopg.Cursor[Any], batch: Batch) -> None:
        """Serialise with whoever else writes the schema.

        One consumer: the schema's lock, exclusive. Scaling out: the schema's lock shared
        (exclusive when :meth:`exclusive` says the batch needs it), then this consumer's
        partitions, sorted, so two holders of one partition (a lease that just changed
        hands) never apply the same batch: the second sees the moved positions.
        """
        if self.leases is None or self.exclusive(batch):
            cur.execute(view_lock(self.schema))
            return
        cur.execute(view_lock(self.schema, shared=True))
        cur.execute("SELECT count(pg_advisory_xact_lock(%s, p)) FROM (SELECT unnest(%s::int[]) AS p ORDER BY 1) s",
                    (batch_class(self.schema), sorted(tp.partition for tp in self._partitions)))

    def exclusive(self, batch: Batch) -> bool:
        """Whether a scaled-out batch must hold the schema alone (for a view: it carries an erasure)."""
        return False

    def _apply_batch(self, cur: psycopg.Cursor[Any], batch: Batch) -> BatchOutcome:
        by_place = {(m.partition, m.offset): m for m in batch.messages}
        records: list[LogRecord] = []
        dead = beyond = 0
        for message, decoded in zip(batch.messages, batch.records):
            if self._cut is not None and not self._cut.admits(message.headers or ()):
                beyond += 1  # a re-send of a later position below the cut's end: not in the log up to the cut
                continue
            problem = decoded.reason if isinstance(decoded, BadRecord) else self.malformed(decoded)
            if problem is not None:
                self._dead_letters.send(message, problem, STAGE_DECODE)
                dead += 1
            else:
                assert isinstance(decoded, LogRecord)
                records.append(decoded)
        identities = {(r.partition, r.offset): record_identity(by_place[(r.partition, r.offset)], r) for r in records}
        new, versions = select_new(records, self._applied_versions(cur, {r.stream_id for r in records}))
        conflicts = self._conflicts(cur, records, new, identities)
        for record, reason in conflicts:
            self._dead_letters.send(by_place[(record.partition, record.offset)], reason, STAGE_CONFLICT)
        refused = self._apply_records(cur, new)
        for record, error in refused:
            self._dead_letters.send(by_place[(record.partition, record.offset)], describe_error(error), STAGE_APPLY)
        self._save_versions(cur, versions)
        refused_at = {(r.partition, r.offset) for r, _ in refused}
        self._save_records(cur, [(r, identities[(r.partition, r.offset)], (r.partition, r.offset) in refused_at)
                                 for r in new])
        return BatchOutcome(applied=len(new) - len(refused), skipped=len(records) - len(new) - len(conflicts),
                            dead_lettered=dead + len(conflicts) + len(refused), beyond_cut=beyond)

    def malformed(self, record: LogRecord) -> str | None:
        """Why a decoded record is not a well-formed record of the topic, or None.

        1. its stream version is below 1 (versions start at 1: a version 0 or -3 would be
           skipped as a duplicate for ever, never applied nor dead-lettered);
        2. its key (the stream id) is empty;
        3. its schema is registered under a subject of another topic (evp names subjects
           ``<topic>-<record name>``, the topic-record-name strategy): a valid Avro value of
           some other topic's type, not one of this topic's events.
        """
        if record.version < 1:
            return f"header {HEADER_STREAM_VERSION} is {record.version}: stream versions start at 1"
        if not record.stream_id:
            return "record key (stream id) is empty"
        if record.schema_id not in self._subjects:
            try:
                subject: str | None = self._decoder().registry.get(record.schema_id).subject
            except SchemaError:
                subject = None
            self._subjects[record.schema_id] = (
                None if subject is not None and subject.startswith(f"{self.topic}-") else
                f"schema id {record.schema_id} ({record.event_type}) is registered under subject {subject!r}, not for "
                f"topic {self.topic!r} (subjects {self.topic}-<record name>): not one of its event types"
            )
        return self._subjects[record.schema_id]

    def _conflicts(self, cur: psycopg.Cursor[Any], records: Sequence[LogRecord], new: Sequence[LogRecord],
                   identities: Mapping[tuple[int, int], bytes]) -> list[tuple[LogRecord, str]]:
        """The skipped records whose (stream, version) was taken by a record with other content (contract step 2).

        A skipped record is compared with the record that took its (stream, version): earlier in
        this batch, or recorded in ``evp_stream_records``. One recorded nowhere (a view made
        before that table, or a version below the first the view read) stays a plain duplicate.
        """
        chosen = {(r.partition, r.offset) for r in new}
        first: dict[tuple[str, int], bytes] = {}
        skipped: list[LogRecord] = []
        for record in records:
            if (record.partition, record.offset) in chosen:
                first[(record.stream_id, record.version)] = identities[(record.partition, record.offset)]
            else:
                skipped.append(record)
        if not skipped:
            return []
        stored = stored_records(cur, self.schema, {(r.stream_id, r.version) for r in skipped} - set(first))
        conflicts: list[tuple[LogRecord, str]] = []
        for record in skipped:
            key = (record.stream_id, record.version)
            known = first[key] if key in first else stored[key][0] if key in stored else None
            if known is not None and known != identities[(record.partition, record.offset)]:
                conflicts.append((record, f"stream {record.stream_id!r} version {record.version} was already taken by a "
                                          f"record with other content; this one (event id {record.event_id}) is not a "
                                          "re-send of it: a conflicting duplicate"))
        return conflicts

    def _save_records(self, cur: psycopg.Cursor[Any], records: Sequence[tuple[LogRecord, bytes, bool]], *,
                      replace: bool = False) -> None:
        """Record each (record, identity, refused) in ``evp_stream_records`` (``replace``: over the row there)."""
        if not records:
            return
        on_conflict = ("DO UPDATE SET identity = EXCLUDED.identity, refused = EXCLUDED.refused" if replace else
                       "DO NOTHING")
        cur.execute(
            sql.SQL("INSERT INTO {}.evp_stream_records (stream_id, version, identity, refused)"
                    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bytea[], %s::boolean[])"
                    " ON CONFLICT (stream_id, version) " + on_conflict).format(sql.Identifier(self.schema)),
            ([r.stream_id for r, _, _ in records], [r.version for r, _, _ in records], [i for _, i, _ in records],
             [refused for _, _, refused in records]),
            binary=True,  # the arrays travel as binary: about twice as fast as their text form here
        )

    def _apply_records(self, cur: psycopg.Cursor[Any], records: Sequence[LogRecord]) -> list[tuple[LogRecord, BaseException]]:
        """Apply all at once; if the database refuses a value, each half again, down to single records.

        Halves are applied in order, each in a savepoint, so the end state is the one the
        records applied one at a time would give. Returns the refused records.
        """
        if not records:
            return []
        try:
            with cur.connection.transaction():
                return list(self.apply(cur, records))
        except POISON_ERRORS as err:
            if len(records) == 1:
                return [(records[0], err)]
        middle = len(records) // 2
        return self._apply_records(cur, records[:middle]) + self._apply_records(cur, records[middle:])

    def _applied_versions(self, cur: psycopg.Cursor[Any], streams: set[str]) -> dict[str, int]:
        if not streams:
            return {}
        rows = cur.execute(
            sql.SQL("SELECT stream_id, version FROM {}.evp_stream_versions WHERE stream_id = ANY(%s)").format(
                sql.Identifier(self.schema)
            ),
            (list(streams),),
        ).fetchall()
        return {s: int(v) for s, v in rows}

    def _save_versions(self, cur: psycopg.Cursor[Any], versions: Mapping[str, int]) -> None:
        if not versions:
            return
        cur.execute(
            sql.SQL(
                "INSERT INTO {s}.evp_stream_versions AS t (stream_id, version)"
                " SELECT * FROM unnest(%s::text[], %s::bigint[])"
                " ON CONFLICT (stream_id) DO UPDATE SET version = GREATEST(t.version, EXCLUDED.version)"
            ).format(s=sql.Identifier(self.schema)),
            (list(versions), list(versions.values())),
        )

    def _save_offsets(self, cur: psycopg.Cursor[Any], messages: Sequence[Any]) -> dict[int, int]:
        nexts: dict[int, int] = {}
        for message in messages:
            nexts[message.partition] = max(nexts.get(message.partition, 0), message.offset + 1)
        if nexts:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {s}.evp_offsets AS t (topic, partition, next_offset)"
                    " SELECT %s, * FROM unnest(%s::int[], %s::bigint[])"
                    " ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()"
                ).format(s=sql.Identifier(self.schema)),
                (self.topic, list(nexts), list(nexts.values())),
            )
        return nexts

    # -- dead letters -----------------------------------------------------------------------
    def replay(self, messages: Sequence[Any], attempts: Mapping[tuple[int, int], int] | None = None) -> ReplayOutcome:
        """Re-drive dead-lettered records (``messages``: as the runner read them) through :meth:`apply`.

        1. each is decoded afresh (a schema registered since reads now) and checked as a
           batch's records are (:meth:`malformed`); one that still fails gets a new letter;
        2. in one transaction under the schema's exclusive lock (no batch runs meanwhile),
           each decoded record is looked up by its (stream, version) in ``evp_stream_records``:
           one applied with the same identity is a duplicate (applied once already: nothing
           is done); one whose (stream, version) holds other content gets a conflict letter;
           the rest are applied in the order given, as a batch's records are, and those
           refused get a new letter;
        3. the applied ones are recorded (``evp_stream_records``; the stream's version is raised
           to theirs when it was lower, so a later re-send of them is skipped); the offsets stay:
           the runner passed these records already. A record is applied where the view stands
           now, after any later version of its stream that was applied meanwhile;
        4. every new letter carries ``attempts`` one above the letter's (``attempts``: per
           (partition, offset), default 0); letters are flushed before the commit.
        """
        conn = self._open_database()
        codec = self._decoder()
        tries = attempts or {}
        outcomes: dict[tuple[int, int], Replayed] = {}
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(view_lock(self.schema))
                by_place = {(m.partition, m.offset): m for m in messages}
                records: list[LogRecord] = []
                for message in messages:
                    place = (message.partition, message.offset)
                    decoded = decode_record(codec, message)
                    problem = decoded.reason if isinstance(decoded, BadRecord) else self.malformed(decoded)
                    if problem is None:
                        assert isinstance(decoded, LogRecord)
                        records.append(decoded)
                        continue
                    self._dead_letters.send(message, problem, STAGE_DECODE, attempts=tries.get(place, 0) + 1)
                    outcomes[place] = Replayed(*place, REPLAY_FAILED, problem)
                identities = {(r.partition, r.offset): record_identity(by_place[(r.partition, r.offset)], r)
                              for r in records}
                stored = dict(stored_records(cur, self.schema, {(r.stream_id, r.version) for r in records}))
                candidates: list[LogRecord] = []
                for record in records:
                    place, key = (record.partition, record.offset), (record.stream_id, record.version)
                    held = stored.get(key)
                    if held is not None and held[0] != identities[place]:
                        reason = (f"stream {record.stream_id!r} version {record.version} holds a record with other "
                                  "content: a conflicting duplicate")
                        self._dead_letters.send(by_place[place], reason, STAGE_CONFLICT, attempts=tries.get(place, 0) + 1)
                        outcomes[place] = Replayed(*place, REPLAY_CONFLICT, reason)
                    elif held is not None and not held[1]:
                        outcomes[place] = Replayed(*place, REPLAY_DUPLICATE)
                    else:
                        candidates.append(record)
                        stored[key] = (identities[place], False)  # a second letter of it in this replay is a duplicate
                refused = self._apply_records(cur, candidates)
                for record, error in refused:
                    place = (record.partition, record.offset)
                    self._dead_letters.send(by_place[place], describe_error(error), STAGE_APPLY,
                                            attempts=tries.get(place, 0) + 1)
                    outcomes[place] = Replayed(*place, REPLAY_FAILED, describe_error(error))
                applied = [r for r in candidates if (r.partition, r.offset) not in outcomes]
                outcomes.update({(r.partition, r.offset): Replayed(r.partition, r.offset, REPLAY_APPLIED) for r in applied})
                latest: dict[str, int] = {}
                for record in applied:
                    latest[record.stream_id] = max(latest.get(record.stream_id, 0), record.version)
                self._save_versions(cur, latest)
                self._save_records(cur, [(r, identities[(r.partition, r.offset)],
                                          outcomes[(r.partition, r.offset)].outcome != REPLAY_APPLIED) for r in candidates],
                                   replace=True)
                self._dead_letters.flush()
        except BaseException:
            self._dead_letters.discard()
            raise
        return ReplayOutcome(tuple(outcomes[(m.partition, m.offset)] for m in messages))

    # -- driving --------------------------------------------------------------------------
    def catch_up(self, on_progress: Callable[[Progress], None] | None = None) -> CatchUpResult:
        """Apply everything up to the end offsets taken now; return what was done."""
        started = time.monotonic()
        self.open()
        assert self._consumer is not None
        with kafka_errors(self.settings):
            ends = {tp.partition: off for tp, off in self._consumer.end_offsets(self._partitions).items()}
        outcome = self._consume_to(ends, on_progress)
        return CatchUpResult(outcome.applied, outcome.skipped, outcome.dead_lettered, time.monotonic() - started)

    def catch_up_to(self, cut: Cut, on_progress: Callable[[Progress], None] | None = None) -> CutCatchUp:
        """Apply the log up to ``cut`` and no further (a past view, :func:`projections.rebuild.rebuild_as_of`).

        1. each partition is read up to the cut's end (0 for a partition the cut does not
           name), never past it: a record at or after the end is dropped from its batch
           before the batch is applied, so the stored offsets stop at the ends;
        2. a record below an end that the cut does not admit (its ``evp.position`` is above
           the cut's: a relay re-sent it after a crash) is skipped and counted as
           ``beyond_cut``; its offset is passed like any other;
        3. everything else is applied as :meth:`catch_up` applies it (duplicates by stream
           version skipped, bad records dead-lettered).
        """
        started = time.monotonic()
        self.open()
        self._cut = cut
        try:
            outcome = self._consume_to({tp.partition: cut.ends.get(tp.partition, 0) for tp in self._partitions},
                                       on_progress)
        finally:
            self._cut = None
        return CutCatchUp(outcome.applied, outcome.skipped, outcome.dead_lettered, time.monotonic() - started,
                          cut=cut, beyond_cut=outcome.beyond_cut)

    def _consume_to(self, ends: Mapping[int, int], on_progress: Callable[[Progress], None] | None) -> BatchOutcome:
        """Apply batches until every partition's position reaches its end in ``ends``."""
        begin = self.positions()
        total = sum(max(0, ends[p] - begin[p]) for p in ends)
        outcome = BatchOutcome()
        last_progress = time.monotonic()
        while True:
            now = self.positions()
            if all(now[p] >= ends[p] for p in ends):
                break
            done = self._next_batch(500)
            if done is not None:
                outcome = outcome + done
                last_progress = time.monotonic()
                if on_progress is not None:
                    consumed = sum(min(pos, ends[p]) - begin[p] for p, pos in self.positions().items() if p in ends)
                    on_progress(Progress(consumed=max(0, consumed), total=total, outcome=outcome))
            elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
                behind = {p: ends[p] - now[p] for p in ends if now[p] < ends[p]}
                raise ServiceUnavailable("kafka", where(self.settings), f"no records for {STALL_TIMEOUT_S:.0f}s while behind {behind}")
        return outcome

    def run(self, stop: threading.Event, on_batch: Callable[[BatchOutcome], None] | None = None) -> None:
        """Apply batches until ``stop`` is set, finishing the batch in hand.

        Outages (a broker or database restart, a cut connection) are retried with the one
        retry policy (:mod:`events.adapters.retry`); anything else — a view declaration
        that is wrong, an integrity failure — stops the runner and says why.
        """

        def step() -> None:
            self.open()
            self.rebalance()
            done = self._next_batch(500)
            if done is not None and on_batch is not None:
                on_batch(done)
            self.between_batches()

        run_until_stopped(stop, step, recover=self._reset, log=log, name=self.owner)

    def between_batches(self) -> None:
        """Work a running consumer does after each poll (the saga coordinator fires due timers); none by default."""

    def lag(self) -> list[PartitionLag]:
        """Per partition: stored next offset, end offset and the difference."""
        return projection_lag(self.settings, self.schema)


class AppendingConsumer(LogConsumer):
    """A consumer whose effects include appends (the saga coordinator, participants).

    :attr:`events` is its :class:`~events.store.client.EventStore` — validation, sealing and
    encoding for what it appends, decryption for what it reads — opened with the loop and
    closed with it; the appends themselves go through the batch's transaction.
    """

    _events: EventStore | None = None

    @property
    def events(self) -> EventStore:
        if self._events is None:
            self._events = EventStore.open(self.settings)
        return self._events

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        super().close()


class ProjectionRunner(LogConsumer):
    """Keeps one declared view's schema up to date with the events topic.

    ``view`` is a :class:`projections.view.View` instance; ``schema`` overrides its declared
    schema (a rebuild's shadow, a second copy). Raises :class:`ConfigurationError` for
    anything but a declared view.
    """

    def __init__(
        self,
        settings: Settings,
        view: View,
        *,
        schema: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        codec: Codec | None = None,
        catalog: Catalog | None = None,
        scale_out: bool = False,
        prefetch: bool = False,
    ) -> None:
        if not isinstance(view, View):
            raise ConfigurationError(f"{view!r} is not a projections.view.View (declare the view as a View subclass)")
        self.view = view
        self.layout = view.layout(schema)
        super().__init__(settings, view.name, self.layout.schema, batch_size=batch_size, codec=codec, catalog=catalog,
                         scale_out=scale_out, prefetch=prefetch)

    def create_tables(self, cur: psycopg.Cursor[Any]) -> None:
        tables.create(cur, self.layout)

    def apply(self, cur: psycopg.Cursor[Any], records: Sequence[LogRecord]) -> list[Refusal]:
        # Scaled out, a row's key may be folded from streams of several partitions: lock the keys.
        return tables.apply(cur, self.view, self.layout, records, lock_keys=self.leases is not None)

    def exclusive(self, batch: Batch) -> bool:
        """An erasure redacts rows of any key: its batch holds the view alone.

        An erasure is known by its ``evp.event_type`` header or by its decoded type (a record
        whose header is missing or lies is still an erasure).
        """
        forgotten = FORGOTTEN.encode()
        return (any(isinstance(r, LogRecord) and r.event_type == FORGOTTEN for r in batch.records)
                or any(key == HEADER_EVENT_TYPE and value == forgotten
                       for m in batch.messages for key, value in (m.headers or [])))


def _below(batch: Batch, ends: Mapping[int, int]) -> Batch:
    """``batch`` without its records at or after their partition's end (positions unchanged)."""
    kept = [(m, r) for m, r in zip(batch.messages, batch.records) if m.offset < ends.get(m.partition, 0)]
    if len(kept) == len(batch.messages):
        return batch
    return Batch([m for m, _ in kept], [r for _, r in kept], batch.positions)


def projection_lag(settings: Settings, schema: str) -> list[PartitionLag]:
    """How far a projection's schema is behind the events topic, per partition.

    The committed offsets are read before the topic's ends: a runner commits only offsets it
    has read, and ends only grow, so a lag is never negative (read the other way round, a
    commit landing between the two reads showed as a lag below zero).
    """
    with postgres.connect(settings.database_url, autocommit=True) as conn, conn.cursor() as cur:
        stored = stored_offsets(cur, schema, settings.events_topic) if _has_offsets(cur, schema) else {}
    ends = end_offsets(settings, settings.events_topic)
    return [PartitionLag(p, stored.get(p), ends[p]) for p in sorted(ends)]


def _has_offsets(cur: psycopg.Cursor[Any], schema: str) -> bool:
    return cur.execute(
        "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'evp_offsets'", (schema,)
    ).fetchone() is not None
