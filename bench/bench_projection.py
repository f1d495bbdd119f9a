"""Projection catch-up vs a plain PostgreSQL COPY of the same rows.

    python bench/bench_projection.py [--small | --large]

Appends SampleSubmitted events (batches of 100 per stream), publishes them, then times:

- evp: ``ProjectionRunner.catch_up`` of the samples view from offset 0: Kafka fetch,
  decode, dedupe by stream version, net changes, COPY into staging + merge, offsets and
  versions in the same transaction;
- baseline: the same rows, already decoded in memory, written with psycopg's text-format
  ``COPY`` into a plain table with the same columns, in one transaction;
- and Kafka alone: a consumer reading the same records without decoding.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kafka import TopicPartition

from _support import DIGITS, throwaway, timed  # noqa: E402  (also puts the repo on sys.path)
from events.adapters import postgres
from events.store.client import EventStore
from events.event import Event
from events.adapters.kafka import consumer
from events.settings import Settings
from projections.runner import ProjectionRunner
from events.project import Project
from projections.declarations import load_view

SIZES = {"small": 2_000, "large": 20_000}
BATCH = 100


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--small", dest="size", action="store_const", const="small")
    group.add_argument("--large", dest="size", action="store_const", const="large")
    count = SIZES[parser.parse_args(argv).size or "small"]
    data = rows(count)
    with throwaway(Settings.from_env()) as settings:
        with EventStore.open(settings) as store:
            for start in range(0, count, BATCH):
                store.append(f"batch-{start}", [Event("SampleSubmitted", row) for row in data[start:start + BATCH]])
            store.flush()
        with ProjectionRunner(settings, load_view(Project.read(DIGITS), "samples")) as runner:
            seconds = timed(runner.catch_up)
        baseline = copy_baseline(settings, data)
        fetch = kafka_only(settings, count)
    print(f"projection catch-up, {count:,} SampleSubmitted events (64 features each)")
    print("| path | rows/s | ratio to COPY |")
    print("|---|---:|---:|")
    for name, took in (("plain COPY of decoded rows (baseline)", baseline), ("evp samples projection", seconds),
                       ("Kafka fetch only, no decode", fetch)):
        print(f"| {name} | {count / took:,.0f} | {baseline / took:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
