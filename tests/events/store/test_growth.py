"""Costs that must not grow with the log: an append and a relay batch read the ledger by index.

Timings would be noise on a shared machine; what PostgreSQL counts is exact. Inside one
transaction, ``pg_stat_xact_user_tables.seq_tup_read`` says how many rows of ``evp_events``
the transaction read by sequential scans: a full scan reads every event, so its cost grows
with the log. The ledger here is fresh and never analyzed, the case where a session's cached
plans used to pick full scans (an append slowed from 31 to 142 µs an event over 40k events).
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timezone
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from events.settings import Settings
from events.store.client import EventStore
from events.store.ledger import SUBJECT_QUERY
from events.store.relay import BATCH_QUERY, Relay

pytestmark = pytest.mark.services

BATCH = 100
APPEND = ("SELECT * FROM evp_append(%s, %s, %s, %s, %s::uuid[], %s::text[], %s::integer[], %s::bytea[], %s::text[],"
          " %s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[])")


def _append(conn: psycopg.Connection[Any], stream: str, partition: int, subject: str = "someone") -> None:
    now = datetime.now(timezone.utc)
    conn.execute(APPEND, (stream, "any", 0, partition, [uuid.uuid4() for _ in range(BATCH)], ["t.E"] * BATCH,
                          [1] * BATCH, [b"x" * 200] * BATCH, ["a"] * BATCH, [subject] * BATCH,
                          [f'["{subject}"]'] * BATCH, [now] * BATCH, [], [], []))


def _rows_scanned(conn: psycopg.Connection[Any]) -> int:
    """Rows of evp_events read by sequential scans so far in this transaction."""
    row = conn.execute("SELECT coalesce(seq_tup_read, 0) FROM pg_stat_xact_user_tables WHERE relname = 'evp_events'"
                       ).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def ledger(store: EventStore, settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """One session (its plan cache is the point) over a ledger of 10k events, none published."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for i in range(100):
            _append(conn, f"s-{i}", i % settings.partitions)
        yield conn


def test_an_append_reads_no_event_row_by_a_full_scan(ledger: psycopg.Connection[Any]) -> None:
    with ledger.transaction():
        _append(ledger, "s-late", 1)
        _append(ledger, "s-0", 0)  # an existing stream: the retry check and the stream row too
        assert _rows_scanned(ledger) == 0
    assert ledger.execute("SELECT count(*) FROM evp_events").fetchone() == (10_200,)


def test_a_relay_batch_reads_neither_the_ledger_nor_the_backlog_in_full(ledger: psycopg.Connection[Any],
                                                                         settings: Settings) -> None:
    with ledger.transaction():
        for _ in range(6):  # past psycopg's prepare threshold: the cached plan is used too
            rows = ledger.execute(BATCH_QUERY, {"partitions": list(range(settings.partitions)), "limit": 2000}).fetchall()
            assert [r[0] for r in rows] == sorted(r[0] for r in rows) and len(rows) == 2000
        assert _rows_scanned(ledger) == 0
        outbox = ledger.execute("SELECT coalesce(seq_tup_read, 0) FROM pg_stat_xact_user_tables"
                                " WHERE relname = 'evp_outbox'").fetchone()
        assert outbox in (None, (0,)), "the backlog is read by index too"


def _table_reads(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
    """(rows read by sequential scans, rows deleted) of the ledger's tables, from every session."""
    rows = conn.execute("SELECT relname, coalesce(seq_tup_read, 0), n_tup_del FROM pg_stat_user_tables"
                        " WHERE relname IN ('evp_events', 'evp_outbox')").fetchall()
    return {name: (int(read), int(deleted)) for name, read, deleted in rows}


def test_publishing_a_backlog_reads_it_by_index(ledger: psycopg.Connection[Any], settings: Settings) -> None:
    before = _table_reads(ledger)
    relay = Relay(settings, batch_size=1000)
    try:
        assert relay.publish_pending() == 10_000
    finally:
        relay.close()  # its session ends: PostgreSQL publishes the session's table statistics
    deadline = time.monotonic() + 10
    after = _table_reads(ledger)
    while after["evp_outbox"][1] - before["evp_outbox"][1] < 10_000 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _table_reads(ledger)
    assert after["evp_outbox"][1] - before["evp_outbox"][1] == 10_000, "the relay's statistics arrived"
    assert {t: after[t][0] - before[t][0] for t in after} == {"evp_events": 0, "evp_outbox": 0}


def _pages_read(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> int:
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + query, params))
    return sum(int(n) for n in re.findall(r"(?:shared hit|read)=(\d+)", plan))


def test_a_subject_query_reads_as_many_pages_at_20k_events_as_at_1k(store: EventStore, settings: Settings) -> None:
    """The audit of one subject costs its answer: 100 events of "probe" among 1k, then 20k."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        _append(conn, "probe-stream", 0, subject="probe")
        for i in range(9):
            _append(conn, f"p-{i}", i % settings.partitions, subject=f"other-{i}")
        early = _pages_read(conn, SUBJECT_QUERY, {"subject": "probe"})
        for i in range(190):
            _append(conn, f"q-{i}", i % settings.partitions, subject=f"other-{i}")
        late = _pages_read(conn, SUBJECT_QUERY, {"subject": "probe"})
        assert len(conn.execute(SUBJECT_QUERY, {"subject": "probe"}).fetchall()) == BATCH
    assert late <= early + 10, f"one subject's query read {early} pages among 1k events and {late} among 20k"
