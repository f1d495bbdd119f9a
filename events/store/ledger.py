"""The stream ledger: expected-version appends with idempotency, in PostgreSQL.

Kafka has no per-key compare-and-set, so the decision "may this event be appended at
version n" is made here, under a row lock on the stream, in the same transaction that
writes the transactional outbox. The relay publishes the outbox afterwards.

Contract of :meth:`Ledger.append`:

1. If the event ids are already in the ledger, the call is a retry: every id must be
   there, in the same stream, and the original positions are returned; nothing is written.
2. Otherwise the stream row is locked; the expected version is checked; on mismatch
   :class:`ConcurrencyError` is raised and nothing is written.
3. Reservations (if any) are claimed, events get versions ``current+1 ..``, rows go to
   ``evp_events`` and ``evp_outbox``, and ``NOTIFY evp_outbox`` wakes relays at commit.

All of it runs server-side in ``evp_append`` (``sql/002_append.sql``): one round trip
per append, whatever the batch size. Called inside a transaction the caller opened, the
append joins it (in a savepoint) and commits or rolls back with the caller's other work.

When the connection fails, what the error says is what is known (:func:`_failure`):

4. a connection found broken before the append is sent (closed, or its socket already
   holds the server's or a proxy's close) raises :class:`ServiceUnavailable` saying
   nothing was written: nothing was sent;
5. on its own (autocommit), the append's statement is its commit: a connection that breaks
   once it is sent, before the answer, raises :class:`OutcomeUnknown`. It may have
   committed; retrying the same event ids is safe, by step 1;
6. inside a caller's transaction the same break loses that whole transaction, uncommitted:
   :class:`ServiceUnavailable`, nothing was written;
7. an error the server answered, the session still open, rolled the append back: the
   verdicts of ``evp_append`` (:func:`_translate`), else an :class:`EvpError` saying
   nothing was written.
"""

from __future__ import annotations

import json
import select
from datetime import datetime
import uuid
from collections.abc import Sequence
from contextlib import nullcontext

import psycopg

from events.errors import (
    ConcurrencyError, EvpError, InvalidEvent, NotFound, OutcomeUnknown, ServiceUnavailable, UniquenessViolation,
)
from events.event import ANY, NO_STREAM, AppendResult, EncodedEvent, ExpectedVersion, RecordedEvent, Reservation
from events.store.partitioning import partition_for

NOTIFY_CHANNEL = "evp_outbox"  #: also named in sql/002_append.sql
MAX_EVENT_BYTES = 900_000  # below Kafka's default 1 MiB message.max.bytes, headers included
MAX_STREAM_ID = 255

#: Read from ``evp_event_log`` (the events with where Kafka acknowledged them, see sql/001_ledger.sql).
EVENT_COLUMNS = (
    "position, stream_id, version, event_id, event_type, schema_id, value, actor, "
    "occurred_at, recorded_at, partition, kafka_offset"
)


def row_to_event(row: tuple) -> RecordedEvent:  # type: ignore[type-arg]
    position, stream_id, version, event_id, event_type, schema_id, value, actor, occurred, recorded, part, off = row
    return RecordedEvent(
        position=position, stream_id=stream_id, version=version, event_id=event_id, event_type=event_type,
        schema_id=schema_id, value=bytes(value), actor=actor, occurred_at=occurred, recorded_at=recorded,
        partition=part, offset=off,
    )


def check_stream_id(stream_id: str) -> None:
    if not isinstance(stream_id, str) or not stream_id or len(stream_id) > MAX_STREAM_ID:
        raise InvalidEvent("append", "stream_id", f"must be a non-empty string of at most {MAX_STREAM_ID} characters")
    check_text("append", "stream_id", stream_id)


def check_text(event_type: str, field: str, value: str | None) -> None:
    """PostgreSQL text cannot hold NUL: refuse it by name rather than fail mid-transaction."""
    if value is not None and "\x00" in value:
        raise InvalidEvent(event_type, field, "must not contain NUL characters")


class Ledger:
    """Appends and reads streams in PostgreSQL.

    ``conn`` must be in autocommit mode: each append is its own explicit transaction and
    reads never leave one open. One instance per connection; not thread-safe.
    """

    def __init__(self, conn: psycopg.Connection, partitions: int) -> None:
        if not conn.autocommit:
            raise EvpError("Ledger needs an autocommit connection (events.adapters.postgres.connect(..., autocommit=True))")
        self._conn = conn
        self._partitions = partitions
        self._where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"  # for messages: never the password

    @property
    def connection(self) -> psycopg.Connection:
        return self._conn

    def append(
        self,
        stream_id: str,
        events: Sequence[EncodedEvent],
        expected_version: ExpectedVersion = ANY,
        reservations: Sequence[Reservation] = (),
    ) -> AppendResult:
        check_stream_id(stream_id)
        if not events:
            raise InvalidEvent("append", "events", "at least one event is needed")
        for event in events:
            if len(event.value) > MAX_EVENT_BYTES:
                raise InvalidEvent(event.event_type, "(record)", f"{len(event.value)} bytes exceeds the {MAX_EVENT_BYTES}-byte limit")
            check_text(event.event_type, "actor", event.actor)
            check_text(event.event_type, "subject_id", event.subject_id)
        if len({e.event_id for e in events}) != len(events):
            raise InvalidEvent("append", "event_id", "the same event id appears twice in one append")
        kind, expected = _expected_arguments(expected_version)
        claims = list(dict.fromkeys([*reservations, *(r for e in events for r in e.reservations)]))
        arguments = (
            stream_id, kind, expected, partition_for(stream_id, self._partitions),
            [e.event_id for e in events], [e.event_type for e in events], [e.schema_id for e in events],
            [e.value for e in events], [e.actor for e in events], [e.subject_id for e in events],
            [json.dumps(list(e.subject_ids)) for e in events],
            [e.occurred_at for e in events], [r.scope for r in claims], [r.value for r in claims],
            [r.subject_id for r in claims],
        )
        lost = _lost_before_sending(self._conn)
        if lost is not None:
            raise ServiceUnavailable("postgresql", self._where, f"the connection was lost before the append to "
                                     f"{stream_id!r} was sent, so nothing was written ({lost}); connect again")
        # Inside a caller's transaction (a saga coordinator's batch) the statement runs in a
        # savepoint, so the retry below does not abort the caller's work.
        joined = self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        for attempt in (1, 2):
            try:
                with self._conn.transaction() if joined else nullcontext():
                    # One statement on an autocommit connection: one round trip, one transaction.
                    row = self._conn.execute(_APPEND, arguments).fetchone()
                assert row is not None
                duplicate, first, last, positions = row
                return AppendResult(stream_id, first, last, tuple(positions), duplicate=duplicate)
            except psycopg.errors.UniqueViolation as err:
                # Another writer committed one of these event ids between our check and our
                # insert: the second attempt sees it and answers as a retry would.
                if attempt == 2:
                    raise ConcurrencyError(stream_id, expected_version, self.version(stream_id)) from err
            except psycopg.Error as err:
                ids = tuple(e.event_id for e in events)
                raise _failure(err, self._conn, joined, self._where, stream_id, ids, expected_version) from err
        raise AssertionError("unreachable")

    def release(self, scope: str, value: str, stream_id: str) -> bool:
        """Free a reservation held by ``stream_id`` (for example after an erasure)."""
        with self._conn.transaction():
            cur = self._conn.execute(
                "DELETE FROM evp_reservations WHERE scope = %s AND value = %s AND stream_id = %s", (scope, value, stream_id)
            )
            return cur.rowcount == 1

    def reservations_of(self, subject_id: str) -> int:
        """How many unique reservations hold ``subject_id``'s values."""
        row = self._conn.execute("SELECT count(*) FROM evp_reservations WHERE subject_id = %s", (subject_id,)).fetchone()
        return int(row[0]) if row else 0

    def release_subject(self, subject_id: str) -> int:
        """Free every reservation of ``subject_id``'s values (an erasure), and only those; returns how many.

        Their blind indexes would otherwise let a holder of the index key test guesses of
        the forgotten values; other subjects' reservations on the same streams stay.
        """
        cur = self._conn.execute("DELETE FROM evp_reservations WHERE subject_id = %s", (subject_id,))
        return cur.rowcount

    def version(self, stream_id: str) -> int | None:
        row = self._conn.execute("SELECT version FROM evp_streams WHERE stream_id = %s", (stream_id,)).fetchone()
        return None if row is None else int(row[0])

    def read_stream(self, stream_id: str, from_version: int = 1) -> list[RecordedEvent]:
        """Every event of a stream from ``from_version`` on, by index: never a topic scan."""
        rows = self._conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE stream_id = %s AND version >= %s ORDER BY version",
            (stream_id, from_version),
        ).fetchall()
        if not rows and from_version <= 1:
            raise NotFound(f"stream {stream_id!r} does not exist")
        return [row_to_event(r) for r in rows]

    def read_stream_as_of(self, stream_id: str, *, position: int | None = None,
                          time: datetime | None = None) -> list[RecordedEvent]:
        """The stream as it was: its events at or below ledger ``position``, or recorded at or
        before ``time`` (``recorded_at`` is when the appending transaction began), by index.

        NotFound when the stream has no event yet at that point (or does not exist).
        """
        rows = self._conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE stream_id = %s AND (%s::bigint IS NULL OR position <= %s)"
            " AND (%s::timestamptz IS NULL OR recorded_at <= %s) ORDER BY version",
            (stream_id, position, position, time, time),
        ).fetchall()
        if not rows:
            when = f"position {position}" if position is not None else f"{time.isoformat() if time else 'now'}"
            raise NotFound(f"stream {stream_id!r} had no event yet at {when}")
        return [row_to_event(r) for r in rows]

    def read_stream_after(self, stream_id: str, version: int) -> list[RecordedEvent]:
        """Events after ``version`` (an empty list for an unknown stream, unlike read_stream)."""
        rows = self._conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE stream_id = %s AND version > %s ORDER BY version",
            (stream_id, version),
        ).fetchall()
        return [row_to_event(r) for r in rows]

    def read_positions(self, positions: Sequence[int]) -> list[RecordedEvent]:
        rows = self._conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE position = ANY(%s) ORDER BY position", (list(positions),)
        ).fetchall()
        return [row_to_event(r) for r in rows]

    def event_by_id(self, event_id: uuid.UUID) -> RecordedEvent | None:
        row = self._conn.execute(f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE event_id = %s", (event_id,)).fetchone()
        return None if row is None else row_to_event(row)

    def events_concerning(self, subject_id: str) -> list[RecordedEvent]:
        """Events whose personal data belongs to ``subject_id`` or that ``subject_id`` performed."""
        rows = self._conn.execute(SUBJECT_QUERY, {"subject": subject_id}).fetchall()
        return [row_to_event(r) for r in rows]

    def streams_with_prefix(self, prefix: str) -> list[str]:
        rows = self._conn.execute(
            "SELECT stream_id FROM evp_streams WHERE stream_id LIKE %s ORDER BY stream_id",
            (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
        ).fetchall()
        return [r[0] for r in rows]



#: Every event concerning ``%(subject)s``, in log order: three indexes (the subjects' GIN, the
#: record's subject, the actor), so its cost is its answer's, whatever the log's size.
SUBJECT_QUERY = (
    f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE subject_ids @> ARRAY[%(subject)s]::text[]"
    " OR subject_id = %(subject)s OR actor = %(subject)s ORDER BY position"
)

# Parameters in binary (%b): psycopg dumps the fifteen arrays in C instead of formatting
# them as text (client CPU of a one-event append 166 -> 140 µs).
_APPEND = (
    "SELECT r_duplicate, r_first, r_last, r_positions FROM evp_append("
    "%b, %b, %b, %b, %b::uuid[], %b::text[], %b::integer[], %b::bytea[], %b::text[], %b::text[], %b::text[],"
    " %b::timestamptz[], %b::text[], %b::text[], %b::text[])"
)


def _expected_arguments(expected: ExpectedVersion) -> tuple[str, int]:
    if expected is ANY:
        return "any", 0
    if expected is NO_STREAM:
        return "no_stream", 0
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidEvent("append", "expected_version", f"must be a version number >= 0, ANY or NO_STREAM, got {expected!r}")
    return "exact", expected


def _lost_before_sending(conn: psycopg.Connection) -> str | None:
    """Why ``conn`` cannot carry a statement, found without sending one; None when it may.

    1. closed, or marked broken by an earlier failure: psycopg would refuse to send;
    2. its socket is readable while no statement runs: the server (or a proxy between) sent
       something unasked. Read it (libpq parses it; a notice or a notification stays
       queued): an end of stream or a reset marks the connection bad, and that is the answer.
    A close that arrives after this check shows up after sending, as an unknown outcome.
    """
    if conn.closed:
        return "the connection is closed"
    poller = select.poll()  # not select.select: a process may hold descriptors above 1024
    try:
        poller.register(conn.pgconn.socket, select.POLLIN)
    except psycopg.OperationalError as err:
        return f"it has no socket: {err}"
    if not poller.poll(0):
        return None
    try:
        conn.pgconn.consume_input()
    except psycopg.OperationalError as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else "the server closed the connection"
    if conn.pgconn.status == psycopg.pq.ConnStatus.BAD:
        return "the server closed the connection"
    return None


def _failure(err: psycopg.Error, conn: psycopg.Connection, joined: bool, where: str, stream_id: str,
             event_ids: tuple[uuid.UUID, ...], expected: ExpectedVersion) -> EvpError:
    """What a failed ``evp_append`` statement means for the append (steps 5-7 of the module's contract)."""
    answered = err.sqlstate is not None and err.diag.severity_nonlocalized == "ERROR"
    if answered or not conn.closed:
        return _translate(err, stream_id, expected)
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if joined:
        return ServiceUnavailable("postgresql", where, f"the connection broke during the append to {stream_id!r} inside "
                                  f"the caller's transaction, which is lost with it, uncommitted: nothing was written "
                                  f"({reason}); run the whole transaction again")
    return OutcomeUnknown(stream_id, event_ids, reason)


def _translate(err: psycopg.Error, stream_id: str, expected: ExpectedVersion) -> EvpError:
    """Map evp_append's own SQLSTATEs to evp's errors; anything else is a plain EvpError."""
    detail = err.diag.message_detail or ""
    if err.sqlstate == "EV409":
        return ConcurrencyError(stream_id, expected, int(detail) if detail else None)
    if err.sqlstate == "EV423":
        return UniquenessViolation(f"{err.diag.message_primary} by stream {detail!r}")
    if err.sqlstate == "EV422":
        where = f" (stream {detail!r})" if detail else ""
        return InvalidEvent("append", "event_id", f"ids were partly appended before or to another stream{where}: "
                            "an idempotency key must name the same events every time")
    return EvpError(f"append to {stream_id!r} failed, nothing was written: {err}")
