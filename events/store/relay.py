"""The relay: publishes the transactional outbox to Kafka, in order, losing nothing.

Contract of one publishing pass over the partitions the relay holds the leases for:

1. read the oldest outbox rows of those partitions, in position order (one query);
2. send each with the idempotent producer (``acks=all``) to its partition, then flush once
   and check every acknowledgement;
3. in one PostgreSQL transaction, record each event's Kafka offset and delete its outbox row.

A crash before step 3 commits leaves the rows in the outbox, so the next holder of the lease
sends them again: nothing is lost, and the duplicates it may cause carry the same event id
and stream version, which consumers dedupe on (Kafka's idempotence only covers one producer
session). Within a stream the order on the topic is the ledger's order, because one stream
maps to one partition and one partition is published by one relay at a time.

Leases are PostgreSQL session advisory locks, one per partition: a relay that dies (even
by SIGKILL) loses its session and with it its leases, and a waiting relay takes over.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from kafka import KafkaProducer

from events.adapters import postgres
from events.adapters.retry import run_until_stopped
from events import faults
from events.errors import EvpError, Retryable, ServiceUnavailable
from events.event import kafka_headers
from events.store.chain import GENESIS, HEADER_CHAIN, link, record_digest
from events.adapters.kafka import kafka_errors, producer as make_producer
from events.settings import Settings
from events.store.ledger import EVENT_COLUMNS, NOTIFY_CHANNEL, row_to_event

log = logging.getLogger(__name__)


_MARK_PUBLISHED = (
    "WITH marked AS ("
    " INSERT INTO evp_published (position, kafka_offset, chain)"
    " SELECT * FROM unnest(%(positions)s::bigint[], %(offsets)s::bigint[], %(links)s::bytea[])"
    " ON CONFLICT (position) DO UPDATE SET kafka_offset = EXCLUDED.kafka_offset, chain = EXCLUDED.chain),"
    " heads AS ("
    " INSERT INTO evp_chain_heads (partition, kafka_offset, chain)"
    " SELECT * FROM unnest(%(partitions)s::integer[], %(head_offsets)s::bigint[], %(heads)s::bytea[])"
    " ON CONFLICT (partition) DO UPDATE SET kafka_offset = EXCLUDED.kafka_offset, chain = EXCLUDED.chain)"
    " DELETE FROM evp_outbox WHERE position = ANY(%(positions)s::bigint[])"
)


#: The next outbox rows of some partitions (``%(partitions)s``, ``%(limit)s``), each joined to
#: its event by primary key. Each step is a LATERAL subquery with a LIMIT, which PostgreSQL
#: cannot flatten into a join, so every one is an index scan whatever the statistics say:
#: the first ``limit`` rows of each partition from (partition, position), then the event by
#: position. A plain join read all of evp_events, and the whole outbox, for every batch, so
#: publishing slowed as the log (or the backlog) grew.
BATCH_QUERY = (
    "SELECT " + ", ".join(f"e.{c.strip()}" for c in EVENT_COLUMNS.split(",")) +
    " FROM unnest(%(partitions)s::integer[]) AS p (partition)"
    " CROSS JOIN LATERAL (SELECT position FROM evp_outbox b WHERE b.partition = p.partition"
    "  ORDER BY b.position LIMIT %(limit)s) o"
    " CROSS JOIN LATERAL (SELECT * FROM evp_events x WHERE x.position = o.position LIMIT 1) e"
    " ORDER BY o.position LIMIT %(limit)s"
)


def lease_class(topic: str) -> int:
    """The advisory-lock class id of a topic's partition leases (a stable 31-bit hash)."""
    return zlib.crc32(f"evp-relay:{topic}".encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class RelayStatus:
    outbox_depth: int
    oldest_age_seconds: float | None
    depth_by_partition: dict[int, int]
    lease_holders: dict[int, int]  # partition -> PostgreSQL backend pid holding it


class Relay:
    """Publishes the outbox for one topic. Run several for availability; leases keep them apart."""

    def __init__(
        self,
        settings: Settings,
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        producer_factory: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        self.settings = settings
        self.database_url, self.bootstrap, self.topic = settings.database_url, settings.kafka, settings.events_topic
        self.partitions, self.batch_size, self.poll_interval = settings.partitions, batch_size, poll_interval
        self._producer_factory = producer_factory or (lambda: make_producer(settings))
        self._producer: KafkaProducer | None = None
        self._conn: psycopg.Connection | None = None
        self._held: set[int] = set()
        self.published = 0

    # -- leases -------------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._held.clear()
            self._conn = postgres.connect(self.database_url, autocommit=True)
            # Every statement of the relay reads or deletes rows by key. A plan that scans
            # the outbox (its statistics lag a backlog) makes each batch cost the backlog.
            self._conn.execute("SET enable_seqscan = off")
            self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return self._conn

    def acquire_leases(self) -> set[int]:
        """Take every free partition lease; keep the ones already held."""
        conn = self._connection()
        for partition in range(self.partitions):
            if partition not in self._held:
                got = conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", (lease_class(self.topic), partition)
                ).fetchone()
                if got and got[0]:
                    self._held.add(partition)
        return set(self._held)

    def release_leases(self) -> None:
        """Hand every lease back (the connection and producer stay) so another relay can publish."""
        try:
            if self._conn is not None and not self._conn.closed:
                for partition in sorted(self._held):
                    self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (lease_class(self.topic), partition))
        except psycopg.Error:
            self._reset_connection()  # a session that is gone holds no locks either
        self._held.clear()

    # -- publishing ---------------------------------------------------------------------
    def publish_pending(self) -> int:
        """Publish everything in the outbox for the partitions held; return how many were sent."""
        self.acquire_leases()
        sent = 0
        while self._held:
            n = self._publish_batch(sorted(self._held))
            sent += n
            if n < self.batch_size:
                break
        self.published += sent
        return sent

    def _publish_batch(self, partitions: list[int]) -> int:
        """One batch over every partition held: one SELECT, the sends, one flush, one mark (in partition order)."""
        conn = self._connection()
        rows = conn.execute(BATCH_QUERY, {"partitions": partitions, "limit": self.batch_size}).fetchall()
        if not rows:
            return 0
        events = [row_to_event(r) for r in rows]
        # Chain the records per partition from the heads the ledger holds (chain.py, steps 2-4).
        heads = {p: GENESIS for p in partitions} | {
            int(p): bytes(c) for p, c in conn.execute(
                "SELECT partition, chain FROM evp_chain_heads WHERE partition = ANY(%s)", (partitions,))}
        links: list[bytes] = []
        producer = self._ensure_producer()
        try:
            with kafka_errors(self.settings):
                futures = []
                for e in events:
                    key, headers = e.stream_id.encode(), kafka_headers(e)
                    heads[e.partition] = link(heads[e.partition], record_digest(key, e.value, headers))
                    links.append(heads[e.partition])
                    futures.append(producer.send(self.topic, value=e.value, key=key, partition=e.partition,
                                                 headers=[*headers, (HEADER_CHAIN, heads[e.partition].hex().encode())]))
                producer.flush()
        except EvpError:
            self._drop_producer()
            raise
        offsets = []
        for event, future in zip(events, futures):
            try:
                metadata = future.get(timeout=0)
            except Exception as err:  # noqa: BLE001 - any send failure means: retry the batch later
                self._drop_producer()
                raise Retryable(f"kafka did not acknowledge position {event.position}: {err}") from err
            offsets.append((event.position, metadata.offset))
        positions = [p for p, _ in offsets]
        faults.reach(faults.RELAY_ACKNOWLEDGED, positions=positions)
        last: dict[int, tuple[int, bytes]] = {}
        for event, (_, offset), chained in zip(events, offsets, links):
            last[event.partition] = (offset, chained)
        # One statement for the whole batch: record where each event landed, its link and the
        # partitions' new heads, and clear it from the outbox, atomically (a crash before this
        # commits means a re-send, from the same heads: the same links).
        conn.execute(_MARK_PUBLISHED, {
            "positions": positions, "offsets": [o for _, o in offsets], "links": links,
            "partitions": list(last), "head_offsets": [o for o, _ in last.values()], "heads": [c for _, c in last.values()],
        })
        return len(events)

    def _ensure_producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = self._producer_factory()
        return self._producer

    def _drop_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=1)
            except Exception:  # noqa: BLE001 - it is already broken
                pass
            self._producer = None

    def newest_pending(self) -> int | None:
        """The highest outbox position right now (None when the outbox is empty)."""
        row = self._connection().execute("SELECT max(position) FROM evp_outbox").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def pending_through(self, position: int) -> int:
        """How many events up to ``position`` still wait in the outbox."""
        row = self._connection().execute("SELECT count(*) FROM evp_outbox WHERE position <= %s", (position,)).fetchone()
        return int(row[0]) if row else 0

    # -- running ------------------------------------------------------------------------
    def wait_for_work(self, timeout: float) -> bool:
        """Sleep until an append is committed (NOTIFY) or ``timeout`` passes; True if woken.

        A NOTIFY that arrives while the relay is publishing is kept by the connection and
        wakes the next wait at once, so no commit waits for the poll interval.
        """
        for _ in self._connection().notifies(timeout=timeout, stop_after=1):
            return True
        return False

    def run(self, stop: threading.Event, on_publish: Callable[[int], None] | None = None) -> None:
        """Publish until ``stop`` is set, surviving broker and database restarts (the one retry policy)."""

        def step() -> None:
            sent = self.publish_pending()
            if on_publish and sent:
                on_publish(sent)
            if not sent:  # wait for work in slices, so a stop is seen within a second
                deadline = time.monotonic() + self.poll_interval
                while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                    if self.wait_for_work(min(left, 1.0)):
                        break

        self._warm_up()
        run_until_stopped(stop, step, recover=self._reset_connection, log=log, name="relay")

    def _warm_up(self) -> None:
        """Connect the producer and learn the topic's leaders before the first append, so the
        first events after a start do not wait for a TLS handshake and a metadata round trip
        (measured: the first ~20 of 200/s appends took 50-130 ms). Failure is fine: the loop
        connects again when it publishes, under the retry policy."""
        try:
            with kafka_errors(self.settings):
                self._ensure_producer().partitions_for(self.topic)
        except EvpError as err:
            log.info("relay: warm-up failed (%s); connecting on the first publish", err)
            self._drop_producer()

    @contextmanager
    def in_background(self) -> Iterator[Relay]:
        """Run this relay in a daemon thread for the ``with`` block; stop and close it after.

        For services and tests that append and want publication to follow by itself; a
        deployment runs ``evp relay run`` instead.
        """
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name=f"relay-{self.topic}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(self.poll_interval + 30)
            self.close()

    def _reset_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._conn = None
        self._held.clear()

    def close(self) -> None:
        self._drop_producer()
        self._reset_connection()


def relay_status(conn: psycopg.Connection, topic: str) -> RelayStatus:
    """Outbox depth, age of the oldest unpublished event, and who holds which lease."""
    depth_rows = conn.execute("SELECT partition, count(*) FROM evp_outbox GROUP BY partition").fetchall()
    oldest = conn.execute(
        "SELECT extract(epoch FROM now() - min(e.recorded_at)) FROM evp_outbox o JOIN evp_events e USING (position)"
    ).fetchone()
    holders = conn.execute(
        "SELECT objid, pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s::oid AND objsubid = 2",
        (lease_class(topic),),
    ).fetchall()
    by_partition = {int(p): int(n) for p, n in depth_rows}
    return RelayStatus(
        outbox_depth=sum(by_partition.values()),
        oldest_age_seconds=float(oldest[0]) if oldest and oldest[0] is not None else None,
        depth_by_partition=by_partition,
        lease_holders={int(o): int(p) for o, p in holders},
    )


def drain(relay: Relay, *, timeout: float = 60.0) -> int:
    """Publish until every event that was in the outbox when called is on Kafka.

    Events appended meanwhile do not extend the wait, so a flush on a busy system ends.
    Partitions leased by another relay are waited for, not taken over; returns how many
    events this call sent itself.
    """
    deadline = time.monotonic() + timeout
    upto = relay.newest_pending()
    total = 0
    while upto is not None:
        total += relay.publish_pending()
        left = relay.pending_through(upto)
        if left == 0:
            break
        if time.monotonic() > deadline:
            raise ServiceUnavailable(
                "relay", relay.topic,
                f"{left} events still unpublished after {timeout:.0f}s (is another relay holding their lease but stuck?)",
            )
        relay.wait_for_work(0.2)
    return total
