"""Backups as the log grows: a full backup, an incremental one, verify and restore vs a raw consume.

    python bench/bench_backup.py [--small | --large]

``--small`` builds a log of 2,000 events, the default 2,000 and 20,000, ``--large`` also
200,000. Each log holds SampleSubmitted events (batches of 100 per stream, published; each
event about 600 bytes). Timed at each size, each against the read it cannot avoid:

- ``backup create`` (full): :func:`events.ops.backup_set.create_backup` into a local folder
  (the cut, every record read, tallied, spooled and written deflated, the manifest MACed);
  its baseline is a raw consume of the whole topic (no decode);
- ``backup verify``: :func:`events.ops.backup_set.verify_set` (MAC, every record re-read and
  hashed, chain links followed); the same baseline;
- ``backup create --incremental`` after 1% more events: only the new records; its baseline
  is a raw consume of those;
- ``backup restore`` of the chain into a fresh database and topic (produce, rebuild the
  ledger, re-read the restored topic to prove the chain heads); the same baseline as the
  full backup.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from _support import sizes_from, throwaway, timed  # noqa: E402  (also puts the repo on sys.path)
from bench_audit import fill
from events.ops.backup import BackupKey
from events.ops.backup_set import create_backup, verify_set
from events.ops.restore import restore_backup
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import end_offsets, read_pinned

SIZES = {"small": (2_000,), "default": (2_000, 20_000), "large": (2_000, 20_000, 200_000)}


def consume(settings: Settings, ranges: dict[int, tuple[int, int]]) -> int:
    return sum(1 for _ in read_pinned(settings, settings.events_topic, ranges))


def measure(count: int) -> list[tuple[str, float, int, float]]:
    """(row, seconds, events the row is per, baseline seconds) for one log size."""
    base = Settings.from_env()
    with throwaway(base) as settings, EventStore.open(settings) as store, tempfile.TemporaryDirectory() as folder:
        fill(store, count)
        location = Path(folder) / "set"
        ends = end_offsets(settings, settings.events_topic)
        raw = timed(lambda: consume(settings, {p: (0, e) for p, e in ends.items()}))
        full = timed(lambda: create_backup(settings, location, publish=store.flush))
        verified = timed(lambda: verify_set(location, BackupKey.from_settings(settings)))
        extra = max(count // 100, 100)
        fill_more(store, count, extra)
        now = end_offsets(settings, settings.events_topic)
        raw_new = timed(lambda: consume(settings, {p: (ends[p], e) for p, e in now.items()}))
        incremental = timed(lambda: create_backup(settings, location, incremental=True, publish=store.flush))
        with throwaway(base) as target:
            target = target.with_(kek_file=settings.kek_path)
            restored = timed(lambda: restore_backup(location, target, backup_key=BackupKey.from_settings(settings)))
    return [("backup create (full)", full, count, raw), ("backup verify", verified, count + extra, raw),
            ("backup create --incremental (+1%)", incremental, extra, raw_new),
            ("backup restore (full + incremental, proved)", restored, count + extra, raw)]


def fill_more(store: EventStore, start: int, count: int) -> None:
    from bench_audit import BATCH, sample

    for at in range(start, start + count, BATCH):
        store.append(f"sample-more-{at}", [sample(i, f"a-{i % 7}") for i in range(at, min(start + count, at + BATCH))])
    store.flush()


def main(argv: Sequence[str] | None = None) -> int:
    sizes = sizes_from(argv, __doc__, SIZES)
    print("### backups (a local folder; baseline: a raw consume of the records the row must read)")
    print()
    print("| log events | operation | seconds | events/s | µs per event | baseline µs per event | ratio to its baseline |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for count in sizes:
        for name, took, per, baseline in measure(count):
            base_per = baseline / (per if "incremental" in name else count)
            print(f"| {count:,} | {name} | {took:.3f} | {per / took:,.0f} | {took / per * 1e6:,.1f} | "
                  f"{base_per * 1e6:,.1f} | {base_per * per / took:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
