"""What consistency costs: appends through the ledger and relay vs a raw Kafka producer.

    python bench/bench_append.py [--small | --large]

``--small`` runs 2,000 events, the default 2,000 and 20,000, ``--large`` also 200,000, each
size in a fresh database, so a cost that grows with the log shows in the per-event column
(the one-event-per-append rows stop at 20,000 events: at commit rate, more says nothing new).

Runs against the services ``platform/services.py up`` started (or ``EVP_KAFKA`` /
``EVP_DATABASE_URL``), in a throwaway database and topic prefix that it removes again.
Measured in the same run, so the ratios hold on whatever machine runs it:

- consistent appends/s: ``EventStore.append`` with expected versions (validate, encode,
  ledger + outbox transaction), then ``flush`` until every event is on the topic; single
  events, and batches of 100 events per append;
- the same batches while ``evp relay run`` publishes them from its own process, until the
  outbox is empty: append and publication overlap, as in a deployment;
- the baseline: kafka-python's idempotent producer (``acks=all``) sending the same encoded
  bytes, keys and headers to a topic of the same shape;
- 1 event per append from 1 writer and from 8 concurrent writers (threads, a store each),
  no flush: PostgreSQL groups concurrent commits into shared WAL flushes;
- append -> on-topic latency p50/p99 (from calling ``append``), with ``evp relay run`` in its
  own process, measured by a consumer that sees each record arrive; 1,000 appends paced at
  200/s, so that this is latency, not queueing behind a backlog.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kafka import TopicPartition

from _support import sizes_from, throwaway, timed  # noqa: E402  (also puts the repo on sys.path)
from events.store.client import EventStore
from events.event import HEADER_EVENT_ID, NO_STREAM, Event, ExpectedVersion, kafka_headers
from events.adapters.kafka import consumer, ensure_topic, producer
from events.settings import Settings

BATCH = 100
STREAMS = 50


SIZES = {"small": (2_000,), "default": (2_000, 20_000), "large": (2_000, 20_000, 200_000)}
SINGLE_CAP = 20_000  #: one-event-per-append rows stop here
LATENCY_SAMPLES, LATENCY_RATE = 1_000, 200.0


@dataclass(frozen=True)
class Throughput:
    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def sample(i: int) -> Event:
    return Event("SampleSubmitted", {"sample_id": f"s-{i}", "annotator_id": f"a-{i % 7}", "features": [float(i % 17)] * 64, "label": i % 10})


# -- measurements ----------------------------------------------------------------------------
class Appender:
    """Appends with expected versions it tracks itself, as a consistent producer would."""

    def __init__(self, store: EventStore, tag: str) -> None:
        self.store, self.tag = store, tag
        self.versions: dict[str, int] = {}
        self.positions: list[int] = []

    def append(self, stream: int, events: Sequence[Event]) -> None:
        stream_id = f"{self.tag}-{stream}"
        current = self.versions.get(stream_id)
        expected: ExpectedVersion = NO_STREAM if current is None else current
        result = self.store.append(stream_id, list(events), expected)
        self.versions[stream_id] = result.last_version
        self.positions.extend(result.positions)


def measure_single(store: EventStore, n: int) -> tuple[Throughput, list[int]]:
    appender = Appender(store, "single")

    def work() -> None:
        for i in range(n):
            appender.append(i % STREAMS, [sample(i)])
        store.flush()

    return Throughput("consistent append, 1 event per append, + flush", n, timed(work)), appender.positions


def measure_batches(store: EventStore, n: int) -> tuple[Throughput, list[int]]:
    appender = Appender(store, "batch")
    batches = [[sample(b * BATCH + j) for j in range(BATCH)] for b in range(n // BATCH)]

    def work() -> None:
        for b, events in enumerate(batches):
            appender.append(b % STREAMS, events)
        store.flush()

    took = timed(work)
    return Throughput(f"consistent append, {BATCH} events per append, + flush", n // BATCH * BATCH, took), appender.positions


def measure_writers(settings: Settings, n: int, writers: int) -> Throughput:
    """``writers`` threads, each with its own store (connection), 1 event per append, no flush:
    what concurrent commits cost, grouped by PostgreSQL's WAL flushes."""
    stores = [EventStore.open(settings) for _ in range(writers)]
    try:
        for i, s in enumerate(stores):
            s.append(f"warm-{writers}-{i}", sample(-1))
        appenders = [Appender(s, f"w{writers}-{i}") for i, s in enumerate(stores)]
        each = n // writers

        def write(appender: Appender) -> None:
            for i in range(each):
                appender.append(i % STREAMS, [sample(i)])

        def work() -> None:
            threads = [threading.Thread(target=write, args=(a,)) for a in appenders]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        plural = "writer" if writers == 1 else "concurrent writers"
        return Throughput(f"consistent append, 1 event per append, {writers} {plural}, no flush", each * writers,
                          timed(work))
    finally:
        for s in stores:
            s.close()


def measure_encoding(store: EventStore, n: int) -> Throughput:
    events = [sample(i) for i in range(n)]
    return Throughput("(validate + encode only, no I/O)", n, timed(lambda: [store.prepare(e) for e in events]))


def measure_raw(store: EventStore, positions: Sequence[int]) -> Throughput:
    """The same bytes, keys and headers the relay sent, through a bare idempotent producer."""
    settings = store.settings
    topic = f"{settings.topic_prefix}.baseline"
    ensure_topic(settings, topic, settings.partitions)
    records = store.ledger.read_positions(positions)
    client = producer(settings)
    try:
        client.send(topic, value=b"warm-up", key=b"warm-up").get(timeout=30)

        def work() -> None:
            for r in records:
                client.send(topic, value=r.value, key=r.stream_id.encode(), headers=kafka_headers(r))
            client.flush()

        return Throughput("raw kafka-python producer (idempotent, acks=all), same bytes", len(records), timed(work))
    finally:
        client.close()


@contextmanager
def relay_process(settings: Settings) -> Iterator[None]:
    """``evp relay run`` in its own process, as a service runs it; stopped with SIGTERM after."""
    relay = subprocess.Popen([sys.executable, "-m", "events.cli.main", "relay", "run"], env=settings.to_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)


def measure_pipelined(store: EventStore, n: int) -> Throughput:
    """Batches of 100 while a relay process publishes them: from the first append until the
    outbox is empty (every event acknowledged by Kafka), the shape of a deployment."""
    appender = Appender(store, "piped")
    batches = [[sample(b * BATCH + j) for j in range(BATCH)] for b in range(n // BATCH)]
    conn = store.ledger.connection
    with relay_process(store.settings):
        time.sleep(3.0)  # the relay starts, takes its leases and goes idle

        def work() -> None:
            for b, events in enumerate(batches):
                appender.append(b % STREAMS, events)
            while conn.execute("SELECT EXISTS (SELECT 1 FROM evp_outbox)").fetchone() != (False,):
                time.sleep(0.005)

        took = timed(work)
    return Throughput(f"consistent append, {BATCH} events per append, relay in its own process", n // BATCH * BATCH, took)


def measure_latency(store: EventStore, samples: int, rate: float) -> list[float]:
    """Seconds from calling ``append`` to a consumer seeing the record, relay running."""
    settings = store.settings
    committed: dict[bytes, float] = {}
    latencies: list[float] = []
    reader = consumer(settings, fetch_max_wait_ms=10)
    tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
    reader.assign(tps)
    reader.seek_to_end(*tps)
    for tp in tps:
        reader.position(tp)
    stop = threading.Event()

    def consume() -> None:
        while len(latencies) < samples and not stop.is_set():
            for messages in reader.poll(timeout_ms=50).values():
                now = time.perf_counter()
                for m in messages:
                    started = committed.get(dict(m.headers)[HEADER_EVENT_ID])
                    if started is not None:
                        latencies.append(now - started)

    consumer_thread = threading.Thread(target=consume, daemon=True)
    consumer_thread.start()
    appender = Appender(store, "latency")
    try:
        with relay_process(settings):
            time.sleep(3.0)  # the relay process starts, takes its leases and goes idle
            for i in range(samples):
                event = sample(i)
                committed[str(event.event_id).encode()] = time.perf_counter()  # before: the relay may beat our return
                appender.append(i % STREAMS, [event])
                time.sleep(1.0 / rate)
            consumer_thread.join(60)
    finally:
        stop.set()
        consumer_thread.join(5)
        reader.close()
    if len(latencies) < samples:
        raise SystemExit(f"only {len(latencies)} of {samples} events reached the topic within 60 s")
    return latencies


def percentile(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# -- report ------------------------------------------------------------------------------------
def measure_size(count: int) -> tuple[list[Throughput], Throughput]:
    """Every throughput row at one log size, in a fresh database, and the raw baseline."""
    single_count = min(count, SINGLE_CAP)
    with throwaway(Settings.from_env()) as settings, EventStore.open(settings) as store:
        store.append("warm-up", sample(-1))  # registers the schema, outside the timings
        store.flush()
        batches, positions = measure_batches(store, count)
        pipelined = measure_pipelined(store, count)
        single, _ = measure_single(store, single_count)
        one_writer = measure_writers(settings, single_count, 1)
        eight_writers = measure_writers(settings, single_count, 8)
        encoding = measure_encoding(store, count)
        raw = measure_raw(store, positions)
    return [single, batches, pipelined, one_writer, eight_writers, encoding], raw


def main(argv: Sequence[str] | None = None) -> int:
    sizes = sizes_from(argv, __doc__, SIZES)
    print("### evp append benchmark")
    print()
    print("| log events | measurement | events | seconds | events/s | µs per event | vs raw producer |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    writers: list[str] = []
    for count in sizes:
        rows, raw = measure_size(count)
        for row in [*rows, raw]:
            ratio = "1.00x" if row is raw else f"{row.rate / raw.rate:.2f}x"
            print(f"| {count:,} | {row.name} | {row.events:,} | {row.seconds:.2f} | {row.rate:,.0f} |"
                  f" {row.seconds / row.events * 1e6:,.1f} | {ratio} |", flush=True)
        writers.append(f"{count:,} events: {rows[4].rate / rows[3].rate:.2f}x")
    print(f"\n8 concurrent writers vs 1 (1 event per append): {'; '.join(writers)}")
    with throwaway(Settings.from_env()) as settings, EventStore.open(settings) as store:
        store.append("warm-up", sample(-1))
        store.flush()
        latencies = measure_latency(store, LATENCY_SAMPLES, LATENCY_RATE)
    print()
    print(f"| append -> on topic (relay in its own process, {len(latencies)} appends at {LATENCY_RATE:.0f}/s) | p50 | p99 | max |")
    print("|---|---:|---:|---:|")
    print(f"| latency, ms | {percentile(latencies, 50) * 1000:.1f} | {percentile(latencies, 99) * 1000:.1f} |"
          f" {max(latencies) * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
