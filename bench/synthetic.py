"""Append a synthetic dataset big enough to show scale: N rows generated from a seed, through the SDK.

    python bench/synthetic.py [--rows 1000000] [--seed 7] [--first 0] [--batch 1000] [--flush-every 20000]
    EVP_PROJECT=bench/synthetic_project evp snapshot create --dataset synthetic
    EVP_PROJECT=bench/synthetic_project evp train --recipe mlp --snapshot ID

Runs against the services in ``EVP_*`` (``platform/services.py env``), into the project
``bench/synthetic_project`` whatever ``EVP_PROJECT`` says (its schema is the one appended).
The contract:

1. row ``i`` (``r`` and 7 digits) depends only on the seed and ``i``: its block of
   :data:`BLOCK` rows draws from a generator seeded by ``(seed, block)``; so any range of
   rows, in any batch size, is the same rows, and the same seed gives the same snapshot
   content hash in any database;
2. a row's 32 features are multiples of 1/256 in [-4, 4] (exact in float32 and Avro's
   float), and its label is the argmax of an integer linear teacher drawn from the seed: the
   teacher's scores are exact integers, so the label does not depend on a BLAS;
3. rows ``[first, first + rows)`` are appended as ``RowGenerated`` events, ``batch`` per
   append, into the stream of their block (``synthetic-`` and the block's first row) at the
   version their place in it requires (so a row appended twice, or before the rows of its
   block that precede it, is refused, naming both); the outbox is published every
   ``flush_every`` rows and at the end, so every event is on the topic when it returns (an
   ``evp relay run`` process publishing alongside was slower at 1,000,000 rows on 2 cores:
   the outbox grew to half a million rows);
4. progress goes to stderr every ``flush_every`` rows, and the rate (rows/s, from the first
   append until every event is on the topic) at the end, with how far the topic's ends moved.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from events.errors import ConcurrencyError, ConfigurationError, EvpError  # noqa: E402
from events.event import NO_STREAM, Event, ExpectedVersion  # noqa: E402
from events.settings import Settings  # noqa: E402
from events.store.client import EventStore  # noqa: E402
from events.store.log import end_offsets  # noqa: E402

PROJECT = Path(__file__).resolve().parent / "synthetic_project"
FEATURES = 32
CLASSES = 10
BLOCK = 1000  #: rows per generator seed: row i comes from block i // BLOCK
SCALE = 256  #: features are whole numbers of 1/SCALE
EVENT_TYPE = "RowGenerated"
Report = Callable[[str], None]


def teacher(seed: int) -> np.ndarray:
    """The fixed linear teacher of ``seed``: integer weights ``[FEATURES + 1, CLASSES]`` (the last row a bias)."""
    return np.random.default_rng([seed, 0]).integers(-8, 9, size=(FEATURES + 1, CLASSES), dtype=np.int64)


def block(seed: int, index: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block ``index`` of ``seed``: features ``[BLOCK, FEATURES]`` (float32) and labels ``[BLOCK]`` (int64)."""
    rng = np.random.default_rng([seed, 1, index])
    units = np.clip(np.rint(rng.standard_normal((BLOCK, FEATURES)) * SCALE), -4 * SCALE, 4 * SCALE).astype(np.int64)
    scores = units @ weights[:FEATURES] + weights[FEATURES] * SCALE  # exact: integers, whatever the order
    return (units.astype(np.float32) / SCALE), scores.argmax(axis=1).astype(np.int64)


def rows(seed: int, first: int, count: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(row index, features, label)`` of rows ``[first, first + count)``, in order (contract step 1)."""
    weights = teacher(seed)
    end = first + count
    for index in range(first // BLOCK, -(-end // BLOCK)):
        features, labels = block(seed, index, weights)
        for offset in range(max(first - index * BLOCK, 0), min(end - index * BLOCK, BLOCK)):
            yield index * BLOCK + offset, features[offset], labels[offset]


def row_id(index: int) -> str:
    return f"r{index:07d}"


@dataclass(frozen=True)
class Generated:
    rows: int
    seconds: float
    events_published: int  #: how far the topic's ends moved: every appended event, once

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def generate(settings: Settings, *, rows_wanted: int, seed: int = 7, first: int = 0, batch: int = BLOCK,
             flush_every: int = 20 * BLOCK, report: Report | None = None) -> Generated:
    """Append rows ``[first, first + rows_wanted)`` of ``seed``; see the module docstring."""
    for name, value, low in (("rows", rows_wanted, 1), ("seed", seed, 0), ("first", first, 0), ("batch", batch, 1),
                             ("flush_every", flush_every, 1)):
        if value < low:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if first + rows_wanted > 10**7:
        raise ConfigurationError(f"rows end at {first + rows_wanted:,}; row ids have 7 digits (at most 10,000,000)")
    settings = settings.with_(project=PROJECT)
    with EventStore.open(settings) as store:
        before = sum(end_offsets(settings, settings.events_topic).values())
        started = time.perf_counter()
        done = 0
        for stream, expected, events in _batches(seed, first, rows_wanted, batch):
            _append(store, stream, expected, events)
            done += len(events)
            if done % flush_every < len(events) and done < rows_wanted:
                store.flush()
                _progress(report, done, rows_wanted, started)
        store.flush()
        took = time.perf_counter() - started
        _progress(report, done, rows_wanted, started)
        published = sum(end_offsets(settings, settings.events_topic).values()) - before
    return Generated(done, took, published)


def _batches(seed: int, first: int, count: int, size: int) -> Iterator[tuple[str, ExpectedVersion, list[Event]]]:
    """``(stream, expected version, events)`` per at most ``size`` rows of one block (contract step 3)."""
    events: list[Event] = []
    for index, features, label in rows(seed, first, count):
        events.append(Event(EVENT_TYPE, {"row_id": row_id(index), "features": features.tolist(), "label": int(label)}))
        if len(events) == size or index == first + count - 1 or index % BLOCK == BLOCK - 1:
            start = index + 1 - len(events)
            offset = start % BLOCK  # the rows of its block before it: the stream's version when it is appended
            yield f"synthetic-{start - offset:07d}", (offset or NO_STREAM), events
            events = []


def _append(store: EventStore, stream: str, expected: ExpectedVersion, events: list[Event]) -> None:
    try:
        store.append(stream, events, expected)
    except ConcurrencyError as err:
        rows = f"{events[0].data['row_id']}..{events[-1].data['row_id']}"
        before = "no rows of this block before them" if expected is NO_STREAM else f"{expected} rows of it before them"
        raise ConfigurationError(
            f"rows {rows} cannot be appended to stream {stream}: it holds {err.actual or 0} rows and these need "
            f"{before}; rows are generated once each and in order within their block of {BLOCK} (use --first)"
        ) from err


def _progress(report: Report | None, done: int, total: int, started: float) -> None:
    if report is not None:
        took = time.perf_counter() - started
        report(f"synthetic: {done:,} / {total:,} rows appended and published, {done / took if took else 0:,.0f} rows/s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="how many rows to append (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=7, help="the teacher's and the rows' seed (default 7)")
    parser.add_argument("--first", type=int, default=0, help="index of the first row (to append more later)")
    parser.add_argument("--batch", type=int, default=BLOCK,
                        help=f"events per append (default {BLOCK}; an append never spans two blocks' streams)")
    parser.add_argument("--flush-every", type=int, default=20 * BLOCK, help="publish the outbox every this many rows")
    args = parser.parse_args(argv)
    try:
        result = generate(Settings.from_env(), rows_wanted=args.rows, seed=args.seed, first=args.first,
                          batch=args.batch, flush_every=args.flush_every,
                          report=lambda line: print(line, file=sys.stderr, flush=True))
    except EvpError as err:
        print(f"synthetic: {err}", file=sys.stderr)
        return 1
    print(f"{result.rows:,} rows (seed {args.seed}, {row_id(args.first)}..{row_id(args.first + args.rows - 1)}) in "
          f"{result.seconds:,.1f} s: {result.rate:,.0f} rows/s appended and published; {result.events_published:,} "
          f"events published; project {PROJECT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
