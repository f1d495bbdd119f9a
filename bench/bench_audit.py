"""Audit queries as the log grows: ``audit subject`` and ``audit verify`` vs the reads they must do.

    python bench/bench_audit.py [--small | --large]

``--small`` builds a log of 2,000 events, the default 2,000 and 20,000, ``--large`` also
200,000 and 1,000,000. Each log holds SampleSubmitted events (batches of 100 per stream,
published), whose annotator is the data subject; one annotator, ``probe``, has exactly 100
events at every size, so a subject query that costs its answer (not the log) shows a flat
row. Timed at each size:

- ``audit subject probe``: :func:`events.ops.audit.subject_history` (the indexed ledger
  query, each event decoded, the read recorded as an ``AuditQueried`` event); its baseline
  is the same SQL alone (``evp_event_log`` by subject), rows fetched, no decode;
- ``audit verify``: :func:`events.ops.integrity.verify_log` (the whole topic read and every
  record compared with the ledger's copy); its baseline is the two reads it cannot avoid, a
  raw consume of the topic (no decode) and one scan of the ledger's event ids and bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _support import sizes_from, throwaway, timed  # noqa: E402  (also puts the repo on sys.path)
from events.event import Event
from events.ops.audit import subject_history
from events.ops.integrity import verify_log
from events.settings import Settings
from events.store.client import EventStore
from events.store.ledger import EVENT_COLUMNS
from events.store.log import end_offsets, read_pinned

SIZES = {"small": (2_000,), "default": (2_000, 20_000), "large": (2_000, 20_000, 200_000, 1_000_000)}
BATCH = 100
PROBE_EVENTS = 100
SUBJECTS = 1_000  #: the other annotators the rest of the log is spread over
QUERIES = 20  #: subject queries timed per size (their mean is reported)


def sample(i: int, annotator: str) -> Event:
    return Event("SampleSubmitted", {"sample_id": f"digit-{i:07d}", "annotator_id": annotator,
                                     "features": [float(i % 17)] * 64, "label": i % 10, "source": "bench"})


def fill(store: EventStore, count: int) -> None:
    """``count`` events, the probe's spread evenly through the log; published."""
    every = count // PROBE_EVENTS
    for start in range(0, count, BATCH):
        events = [sample(i, "probe" if i % every == 0 else f"a-{i % SUBJECTS}") for i in range(start, min(count, start + BATCH))]
        store.append(f"sample-batch-{start}", events)
        if start % 50_000 == 0 and start:
            store.flush()  # keep the outbox short, as a running relay would
            print(f"  ... {start:,} of {count:,} events written", file=sys.stderr, flush=True)
    store.flush()


def measure(count: int) -> list[tuple[str, float, int]]:
    """(row, seconds, events the row is per) for one log size."""
    with throwaway(Settings.from_env()) as settings, EventStore.open(settings) as store:
        fill(store, count)
        conn = store.ledger.connection
        probe_sql = (f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE subject_ids @> ARRAY[%s]::text[]"
                     " OR subject_id = %s OR actor = %s ORDER BY position")
        assert len(subject_history(store, "probe")) == PROBE_EVENTS  # warm-up, and the answer is right
        sql_only = timed(lambda: [conn.execute(probe_sql, ("probe",) * 3).fetchall() for _ in range(QUERIES)]) / QUERIES
        audited = timed(lambda: [subject_history(store, "probe") for _ in range(QUERIES)]) / QUERIES
        ranges = {p: (0, end) for p, end in end_offsets(settings, settings.events_topic).items()}

        def raw_reads() -> None:
            sum(1 for _ in read_pinned(settings, settings.events_topic, ranges))
            conn.execute("SELECT event_id, value FROM evp_events").fetchall()

        reads = timed(raw_reads)
        report = None

        def verify() -> None:
            nonlocal report
            report = verify_log(store)

        verified = timed(verify)
        assert report is not None and report.intact and report.records_read >= count, report
    return [("subject query, SQL alone (baseline)", sql_only, PROBE_EVENTS),
            ("evp audit subject (decode, record the read)", audited, PROBE_EVENTS),
            ("raw topic consume + ledger scan (baseline)", reads, count),
            ("evp audit verify (every record compared)", verified, count)]


def main(argv: Sequence[str] | None = None) -> int:
    sizes = sizes_from(argv, __doc__, SIZES)
    print(f"### audit queries (a subject with {PROBE_EVENTS} events; verify over the whole log)")
    print()
    print("| log events | query | seconds | events/s | µs per event | ratio to its baseline |")
    print("|---:|---|---:|---:|---:|---:|")
    for count in sizes:
        rows = measure(count)
        for index, (name, took, per) in enumerate(rows):
            baseline = rows[index - index % 2][1]
            print(f"| {count:,} | {name} | {took:.4f} | {per / took:,.0f} | {took / per * 1e6:,.1f} | {baseline / took:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
