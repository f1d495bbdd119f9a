"""The stream ledger: expected-version appends with idempotency, in PostgreSQL.

Kafka has no per-key compare-and-set, so the decision "may this event be appended at
version n" is made here, under a row lock on the stream, in the same transaction that
writes the transactional outbox. The relay publishes the outbox afterwards.

Contract of :meth:`Ledger.append`:

1. If the first event id is already in the ledger, the call is a retry: every id must be
   there, in the same stream, and the original positions are returned; nothing is written.
2. Otherwise the stream row is locked; the expected version is checked; on mismatch
   :class:`ConcurrencyError` is raised and nothing is written.
3. Events get versions ``current+1 ..``, rows go to ``evp_events`` and ``evp_outbox``,
   reservations (if any) are claimed, and ``NOTIFY evp_outbox`` wakes relays at commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import tuple_row

from events.errors import ConcurrencyError, EvpError, InvalidEvent, NotFound, UniquenessViolation
from events.event import ANY, NO_STREAM, AppendResult, EncodedEvent, ExpectedVersion, RecordedEvent
from events.partitioning import partition_for

NOTIFY_CHANNEL = "evp_outbox"
MAX_EVENT_BYTES = 900_000  # below Kafka's default 1 MiB message.max.bytes, headers included
MAX_STREAM_ID = 255

EVENT_COLUMNS = (
    "position, stream_id, version, event_id, event_type, schema_id, value, actor, "
    "occurred_at, recorded_at, partition, kafka_offset"
)


@dataclass(frozen=True)
class Reservation:
    """A claim that ``value`` is unique within ``scope`` (for example an email's blind index)."""

    scope: str
    value: str


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


class Ledger:
    """Appends and reads streams in PostgreSQL.

    ``conn`` must be in autocommit mode: each append is its own explicit transaction and
    reads never leave one open. One instance per connection; not thread-safe.
    """

    def __init__(self, conn: psycopg.Connection, partitions: int) -> None:
        if not conn.autocommit:
            raise EvpError("Ledger needs an autocommit connection (events.db.connect(..., autocommit=True))")
        self._conn = conn
        self._partitions = partitions

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
        if len({e.event_id for e in events}) != len(events):
            raise InvalidEvent("append", "event_id", "the same event id appears twice in one append")
        try:
            with self._conn.transaction():
                earlier = self._already_appended(stream_id, events)
                if earlier is not None:
                    return earlier
                current = self._lock_stream(stream_id)
                _check_expected(stream_id, expected_version, current)
                return self._write(stream_id, events, current, reservations)
        except psycopg.errors.UniqueViolation as err:
            # Another writer committed the same event id between our check and our insert.
            earlier = self._already_appended(stream_id, events)
            if earlier is not None:
                return earlier
            raise ConcurrencyError(stream_id, expected_version, self.version(stream_id)) from err
        except psycopg.OperationalError as err:
            raise EvpError(f"append to {stream_id!r} failed, nothing was written: {err}") from err

    def _already_appended(self, stream_id: str, events: Sequence[EncodedEvent]) -> AppendResult | None:
        ids = [e.event_id for e in events]
        rows = self._conn.execute(
            "SELECT event_id, stream_id, version, position FROM evp_events WHERE event_id = ANY(%s)", (ids,)
        ).fetchall()
        if not rows:
            return None
        found = {row[0]: row for row in rows}
        missing = [str(i) for i in ids if i not in found]
        elsewhere = sorted({row[1] for row in rows if row[1] != stream_id})
        if missing or elsewhere:
            raise InvalidEvent(
                "append", "event_id",
                f"ids were partly appended before (missing {missing}) or to other streams {elsewhere}: "
                "an idempotency key must name the same events every time",
            )
        ordered = [found[i] for i in ids]
        return AppendResult(stream_id, ordered[0][2], ordered[-1][2], tuple(r[3] for r in ordered), duplicate=True)

    def _lock_stream(self, stream_id: str) -> int | None:
        row = self._conn.execute(
            "SELECT version FROM evp_streams WHERE stream_id = %s FOR UPDATE", (stream_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _write(
        self, stream_id: str, events: Sequence[EncodedEvent], current: int | None, reservations: Sequence[Reservation]
    ) -> AppendResult:
        conn = self._conn
        base = current or 0
        if current is None:
            inserted = conn.execute(
                "INSERT INTO evp_streams (stream_id, version) VALUES (%s, 0) ON CONFLICT DO NOTHING RETURNING version",
                (stream_id,),
            ).fetchone()
            if inserted is None:  # created concurrently; it has committed since (ON CONFLICT waited)
                raise ConcurrencyError(stream_id, NO_STREAM, self._lock_stream(stream_id))
        for reservation in reservations:
            self._reserve(stream_id, reservation)
        partition = partition_for(stream_id, self._partitions)
        positions: list[int] = []
        with conn.cursor(row_factory=tuple_row) as cur:
            for offset, event in enumerate(events, start=1):
                cur.execute(
                    "INSERT INTO evp_events (stream_id, version, event_id, event_type, schema_id, value, actor,"
                    " subject_id, occurred_at, partition) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " RETURNING position",
                    (stream_id, base + offset, event.event_id, event.event_type, event.schema_id, event.value,
                     event.actor, event.subject_id, event.occurred_at, partition),
                )
                positions.append(cur.fetchone()[0])  # type: ignore[index]
            cur.executemany("INSERT INTO evp_outbox (position, partition) VALUES (%s, %s)", [(p, partition) for p in positions])
            cur.execute("UPDATE evp_streams SET version = %s, updated_at = now() WHERE stream_id = %s", (base + len(events), stream_id))
            cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(partition)))
        return AppendResult(stream_id, base + 1, base + len(events), tuple(positions))

    def _reserve(self, stream_id: str, reservation: Reservation) -> None:
        row = self._conn.execute(
            "INSERT INTO evp_reservations (scope, value, stream_id) VALUES (%s, %s, %s)"
            " ON CONFLICT (scope, value) DO UPDATE SET scope = EXCLUDED.scope RETURNING stream_id",
            (reservation.scope, reservation.value, stream_id),
        ).fetchone()
        holder = row[0] if row else stream_id
        if holder != stream_id:
            raise UniquenessViolation(f"{reservation.scope} is already reserved by stream {holder!r}")

    def release(self, scope: str, value: str, stream_id: str) -> bool:
        """Free a reservation held by ``stream_id`` (for example after an erasure)."""
        with self._conn.transaction():
            cur = self._conn.execute(
                "DELETE FROM evp_reservations WHERE scope = %s AND value = %s AND stream_id = %s", (scope, value, stream_id)
            )
            return cur.rowcount == 1

    def version(self, stream_id: str) -> int | None:
        row = self._conn.execute("SELECT version FROM evp_streams WHERE stream_id = %s", (stream_id,)).fetchone()
        return None if row is None else int(row[0])

    def read_stream(self, stream_id: str, from_version: int = 1) -> list[RecordedEvent]:
        """Every event of a stream from ``from_version`` on, by index: never a topic scan."""
        rows = self._conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM evp_events WHERE stream_id = %s AND version >= %s ORDER BY version",
            (stream_id, from_version),
        ).fetchall()
        if not rows and from_version <= 1:
            raise NotFound(f"stream {stream_id!r} does not exist")
        return [row_to_event(r) for r in rows]

    def read_positions(self, positions: Sequence[int]) -> list[RecordedEvent]:
        rows = self._conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM evp_events WHERE position = ANY(%s) ORDER BY position", (list(positions),)
        ).fetchall()
        return [row_to_event(r) for r in rows]

    def event_by_id(self, event_id: uuid.UUID) -> RecordedEvent | None:
        row = self._conn.execute(f"SELECT {EVENT_COLUMNS} FROM evp_events WHERE event_id = %s", (event_id,)).fetchone()
        return None if row is None else row_to_event(row)

    def events_concerning(self, subject_id: str) -> list[RecordedEvent]:
        """Events whose personal data belongs to ``subject_id`` or that ``subject_id`` performed."""
        rows = self._conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM evp_events WHERE subject_id = %s OR actor = %s ORDER BY position",
            (subject_id, subject_id),
        ).fetchall()
        return [row_to_event(r) for r in rows]

    def streams_with_prefix(self, prefix: str) -> list[str]:
        rows = self._conn.execute(
            "SELECT stream_id FROM evp_streams WHERE stream_id LIKE %s ORDER BY stream_id",
            (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
        ).fetchall()
        return [r[0] for r in rows]



def _check_expected(stream_id: str, expected: ExpectedVersion, current: int | None) -> None:
    if expected is ANY:
        return
    if expected is NO_STREAM:
        if current is not None and current > 0:
            raise ConcurrencyError(stream_id, expected, current)
        return
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidEvent("append", "expected_version", f"must be a version number >= 0, ANY or NO_STREAM, got {expected!r}")
    if (current or 0) != expected:
        raise ConcurrencyError(stream_id, expected, current)
