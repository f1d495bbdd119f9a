"""Projection catch-up vs a plain PostgreSQL COPY of the same rows, at several sizes.

    python bench/bench_projection.py [--small | --large]

``--small`` runs 2,000 events, the default 2,000 and 20,000, ``--large`` also 200,000, so a
cost that grows with the log shows in the per-event column. At each size it appends
SampleSubmitted events (batches of 100 per stream, over 4 partitions), publishes them, then
times (connections, schema creation and the consumer's start outside the timed region):

- evp: ``ProjectionRunner.catch_up`` of the samples view from offset 0: Kafka fetch,
  decode, dedupe by stream version, net changes, COPY into staging + merge, offsets and
  versions in the same transaction;
- the same with ``prefetch=True``: fetch and decode in a process of their own, one batch
  ahead of the apply (:mod:`events.store.source`);
- two runners scaling out (``scale_out=True``), each in its own process with half of the
  partitions' leases, from the moment both hold their share until both have caught up;
- baseline: the same rows, already decoded in memory, written with psycopg's text-format
  ``COPY`` into a plain table with the same columns, in one transaction;
- and Kafka alone: a consumer reading the same records without decoding.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Sequence
from typing import Any

from kafka import TopicPartition

from _support import DIGITS, sizes_from, throwaway, timed  # noqa: E402  (also puts the repo on sys.path)
from events.adapters import postgres
from events.store.client import EventStore
from events.event import Event
from events.adapters.kafka import consumer
from events.settings import Settings
from projections.runner import ProjectionRunner
from events.project import Project
from projections.declarations import load_view

SIZES = {"small": (2_000,), "default": (2_000, 20_000), "large": (2_000, 20_000, 200_000)}
BATCH = 100
PARTITIONS = 4  #: an even number, so two runners get equal shares


def rows(count: int) -> list[dict[str, object]]:
    return [{"sample_id": f"s-{i}", "annotator_id": f"a-{i % 7}", "features": [float(i % 17)] * 64, "label": i % 10}
            for i in range(count)]


def copy_baseline(settings: Settings, data: Sequence[dict[str, object]]) -> float:
    with postgres.connect(settings.database_url) as conn:
        conn.execute("CREATE TABLE plain_samples (sample_id text PRIMARY KEY, annotator_id text, label integer,"
                     " features real[])")
        conn.commit()

        def copy() -> None:
            with conn.cursor() as cur, cur.copy("COPY plain_samples FROM STDIN") as out:
                for row in data:
                    out.write_row((row["sample_id"], row["annotator_id"], row["label"],
                                   "{" + str(row["features"])[1:-1] + "}"))
            conn.commit()

        return timed(copy)


def kafka_only(settings: Settings, total: int) -> float:
    reader = consumer(settings)
    partitions = [TopicPartition(settings.events_topic, p) for p in sorted(reader.partitions_for_topic(settings.events_topic))]
    reader.assign(partitions)
    reader.seek_to_beginning()

    def drain() -> None:
        seen = 0
        while seen < total:
            seen += sum(len(batch) for batch in reader.poll(timeout_ms=500).values())

    try:
        return timed(drain)
    finally:
        reader.close()


def one_runner(settings: Settings, schema: str, *, prefetch: bool = False) -> float:
    with ProjectionRunner(settings, load_view(Project.read(DIGITS), "samples"), schema=schema,
                          prefetch=prefetch) as runner:
        runner.open()  # setup outside the timed region
        return timed(runner.catch_up)


def _share(settings: Settings, schema: str, ready: Any, go: Any, done: Any) -> None:
    """A child process: join the view's runners, wait for an even split of the leases, catch up."""
    with ProjectionRunner(settings, load_view(Project.read(DIGITS), "samples"), schema=schema,
                          scale_out=True) as runner:
        runner.open()
        ready.wait()
        assert runner.leases is not None
        while len(runner.leases.held) != PARTITIONS // 2:
            runner.rebalance(force=True)
            time.sleep(0.02)
        go.wait()
        runner.catch_up()
        done.put(sorted(runner.leases.held))


def two_runners(settings: Settings, schema: str) -> float:
    """Two scaled-out runner processes: from both holding half the leases until both caught up."""
    spawn = multiprocessing.get_context("spawn")
    ready, go, done = spawn.Barrier(2), spawn.Barrier(3), spawn.Queue()
    children = [spawn.Process(target=_share, args=(settings, schema, ready, go, done)) for _ in range(2)]
    for child in children:
        child.start()
    go.wait()
    started = time.perf_counter()
    shares = [done.get(timeout=600) for _ in children]
    took = time.perf_counter() - started
    for child in children:
        child.join(timeout=60)
    assert sorted(p for share in shares for p in share) == list(range(PARTITIONS)), shares
    return took


def measure(count: int) -> list[tuple[str, float]]:
    data = rows(count)
    with throwaway(Settings.from_env().with_(partitions=PARTITIONS)) as settings:
        with EventStore.open(settings) as store:
            for start in range(0, count, BATCH):
                store.append(f"batch-{start}", [Event("SampleSubmitted", row) for row in data[start:start + BATCH]])
            store.flush()
        one = one_runner(settings, "samples_one")
        ahead = one_runner(settings, "samples_prefetch", prefetch=True)
        two = two_runners(settings, "samples_two")
        baseline = copy_baseline(settings, data)
        fetch = kafka_only(settings, count)
    return [("plain COPY of decoded rows (baseline)", baseline), ("evp samples projection, one runner", one),
            ("evp samples projection, one runner, fetch + decode in a prefetch process", ahead),
            ("evp samples projection, two runners scaling out", two), ("Kafka fetch only, no decode", fetch)]


def main(argv: Sequence[str] | None = None) -> int:
    sizes = sizes_from(argv, __doc__, SIZES)
    print("### projection catch-up (SampleSubmitted events, 64 features each)")
    print()
    print("| events | path | rows/s | µs per event | ratio to COPY | ratio to one runner |")
    print("|---:|---|---:|---:|---:|---:|")
    for count in sizes:
        results = measure(count)
        baseline, one = results[0][1], results[1][1]
        for name, took in results:
            print(f"| {count:,} | {name} | {count / took:,.0f} | {took / count * 1e6:,.1f} | {baseline / took:.2f}x"
                  f" | {one / took:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
