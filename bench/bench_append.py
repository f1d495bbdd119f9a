"""What consistency costs: appends through the ledger and relay vs a raw Kafka producer.

    python bench/bench_append.py [--small | --large]

Runs against the services ``platform/services.py up`` started (or ``EVP_KAFKA`` /
``EVP_DATABASE_URL``), in a throwaway database and topic prefix that it removes again.
Measured in the same run, so the ratios hold on whatever machine runs it:

- consistent appends/s: ``EventStore.append`` with expected versions (validate, encode,
  ledger + outbox transaction), then ``flush`` until every event is on the topic; single
  events, and batches of 100 events per append;
- the baseline: kafka-python's idempotent producer (``acks=all``) sending the same encoded
  bytes, keys and headers to a topic of the same shape;
- 1 event per append from 1 writer and from 8 concurrent writers (threads, a store each),
  no flush: PostgreSQL groups concurrent commits into shared WAL flushes;
- append -> on-topic latency p50/p99 (from calling ``append``), with ``evp relay run`` in its own process, measured by a
  consumer that sees each record arrive; appends are paced so that this is latency, not
  queueing behind a backlog.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kafka import TopicPartition

from _support import throwaway, timed  # noqa: E402  (also puts the repo on sys.path)
from events.store.client import EventStore
from events.event import HEADER_EVENT_ID, NO_STREAM, Event, ExpectedVersion, kafka_headers
from events.adapters.kafka import consumer, ensure_topic, producer
from events.settings import Settings

BATCH = 100
STREAMS = 50


@dataclass(frozen=True)
class Size:
    events: int
    latency_samples: int
    latency_rate: float  # appends per second while measuring latency


SIZES = {"small": Size(2_000, 200, 100.0), "large": Size(20_000, 1_000, 200.0)}


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


def measure_batches(store: EventStore, n: int) -> Throughput:
    appender = Appender(store, "batch")

    def work() -> None:
        for b in range(n // BATCH):
            appender.append(b % STREAMS, [sample(b * BATCH + j) for j in range(BATCH)])
        store.flush()

    return Throughput(f"consistent append, {BATCH} events per append, + flush", n // BATCH * BATCH, timed(work))


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
    # The relay in its own process, as a service runs it (`evp relay run`).
    relay = subprocess.Popen([sys.executable, "-m", "events.cli.main", "relay", "run"], env=settings.to_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

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
        time.sleep(3.0)  # the relay process starts, takes its leases and goes idle
        for i in range(samples):
            event = sample(i)
            committed[str(event.event_id).encode()] = time.perf_counter()  # before: the relay may beat our return
            appender.append(i % STREAMS, [event])
            time.sleep(1.0 / rate)
        consumer_thread.join(60)
    finally:
        stop.set()
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)
        consumer_thread.join(5)
        reader.close()
    if len(latencies) < samples:
        raise SystemExit(f"only {len(latencies)} of {samples} events reached the topic within 60 s")
    return latencies


def percentile(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# -- report ------------------------------------------------------------------------------------
def report(size_name: str, rows: Sequence[Throughput], raw: Throughput, latencies: Sequence[float], rate: float) -> str:
    lines = [
        f"### evp append benchmark ({size_name})",
        "",
        "| measurement | events | seconds | events/s | vs raw producer |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in [*rows, raw]:
        ratio = "1.00x" if row is raw else f"{row.rate / raw.rate:.2f}x"
        lines.append(f"| {row.name} | {row.events} | {row.seconds:.2f} | {row.rate:,.0f} | {ratio} |")
    lines += [
        "",
        f"| append -> on topic (relay in its own process, {len(latencies)} appends at {rate:.0f}/s) | p50 | p99 | max |",
        "|---|---:|---:|---:|",
        f"| latency, ms | {percentile(latencies, 50) * 1000:.1f} | {percentile(latencies, 99) * 1000:.1f} | {max(latencies) * 1000:.1f} |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--small", dest="size", action="store_const", const="small", help="~2k events (default)")
    group.add_argument("--large", dest="size", action="store_const", const="large", help="~20k events")
    size_name = parser.parse_args(argv).size or "small"
    size = SIZES[size_name]
    with throwaway(Settings.from_env()) as settings, EventStore.open(settings) as store:
        store.append("warm-up", sample(-1))  # registers the schema, outside the timings
        store.flush()
        single, positions = measure_single(store, size.events)
        batches = measure_batches(store, size.events)
        one_writer = measure_writers(settings, size.events, 1)
        eight_writers = measure_writers(settings, size.events, 8)
        encoding = measure_encoding(store, size.events)
        raw = measure_raw(store, positions)
        latencies = measure_latency(store, size.latency_samples, size.latency_rate)
    print(report(size_name, [single, batches, one_writer, eight_writers, encoding], raw, latencies, size.latency_rate))
    print(f"\n8 concurrent writers vs 1 (1 event per append): {eight_writers.rate / one_writer.rate:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
