"""Snapshot creation vs a raw consume of the same offset range, at several sizes.

    python bench/bench_snapshot.py [--small | --large]

``--small`` runs 2,000 events, the default 2,000 and 20,000, ``--large`` also 200,000. At
each size it appends SampleSubmitted events (batches of 100 per stream; the features are
not personal, the annotator's stream is not needed), publishes them, then times:

- evp: ``trainer.snapshot.create_snapshot`` of the digits dataset: pinned end offsets,
  fetch, decode, dedupe by stream version, the fold into rows, the shards written and hashed,
  the content hash, the manifest and its ``SnapshotCreated`` event;
- baseline: a kafka-python consumer reading the same records (no decode), the ceiling of
  any reader of the topic in this process;
- and the same consumer also Avro-decoding every record with the codec, no fold.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _support import DIGITS, sizes_from, throwaway, timed  # noqa: E402  (also puts the repo on sys.path)
from events.event import Event
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import decode_record, end_offsets, read_pinned
from trainer.snapshot import create_snapshot, load_dataset

SIZES = {"small": (2_000,), "default": (2_000, 20_000), "large": (2_000, 20_000, 200_000)}
BATCH = 100


def sample(i: int) -> Event:
    return Event("SampleSubmitted", {"sample_id": f"digit-{i:06d}", "annotator_id": f"a-{i % 7}",
                                     "features": [float(i % 17)] * 64, "label": i % 10, "source": "bench"})


def measure(count: int) -> list[tuple[str, float]]:
    with throwaway(Settings.from_env()) as settings, EventStore.open(settings) as store:
        for start in range(0, count, BATCH):
            store.append(f"sample-batch-{start}", [sample(i) for i in range(start, min(count, start + BATCH))])
        store.flush()
        ranges = {p: (0, end) for p, end in end_offsets(settings, settings.events_topic).items()}
        dataset = load_dataset(Project.read(DIGITS), "digits")
        create_snapshot(store, dataset)  # warm-up: imports, registry, consumer metadata
        raw = timed(lambda: sum(1 for _ in read_pinned(settings, settings.events_topic, ranges)))
        decoded = timed(lambda: [decode_record(store.codec, m) for m in read_pinned(settings, settings.events_topic, ranges)])
        snapshot = timed(lambda: create_snapshot(store, dataset))
    return [("raw consume of the same range, no decode (baseline)", raw), ("consume + Avro decode, no fold", decoded),
            ("evp create_snapshot (fold, shards, hashes, manifest event)", snapshot)]


def main(argv: Sequence[str] | None = None) -> int:
    sizes = sizes_from(argv, __doc__, SIZES)
    print("### snapshot creation (digits dataset, SampleSubmitted events of 64 features)")
    print()
    print("| events | path | records/s | µs per event | ratio to raw consume |")
    print("|---:|---|---:|---:|---:|")
    for count in sizes:
        results = measure(count)
        baseline = results[0][1]
        for name, took in results:
            print(f"| {count:,} | {name} | {count / took:,.0f} | {took / count * 1e6:,.1f} | {baseline / took:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
