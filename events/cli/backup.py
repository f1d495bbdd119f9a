"""``evp backup create PATH``, ``evp backup verify PATH`` and ``evp backup restore PATH``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from events.ops.backup import Manifest, OnProgress, Progress, create_backup, verify_backup
from events.ops.restore import restore_backup
from events.cli.common import print_json
from events.store.client import EventStore
from events.privacy.keyring import PostgresKeyStore
from events.settings import Settings


@contextmanager
def _progress() -> Iterator[OnProgress]:
    """One bar per phase on a terminal (stderr, so stdout stays clean); silent otherwise."""
    bars: dict[str, tqdm] = {}

    def update(progress: Progress) -> None:
        bar = bars.get(progress.phase)
        if bar is None:
            for done in bars.values():
                done.close()
            bar = bars[progress.phase] = tqdm(desc=progress.phase, total=progress.total, unit="rec",
                                              disable=None, file=sys.stderr)
        bar.n = progress.done
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def _describe(path: str, manifest: Manifest) -> str:
    ranges = ", ".join(f"{p}:[{s}, {e})" for p, (s, e) in sorted(manifest.ranges.items()))
    return (f"backup {path}: {manifest.records} records of {manifest.topic} (partitions {ranges}), "
            f"{manifest.schema_records} schema records, taken {manifest.created_at}\nsha256 {manifest.sha256}")


def _create(args: argparse.Namespace, settings: Settings) -> int:
    if not args.no_flush:  # events still in the outbox belong in the backup
        with EventStore.open(settings) as store:
            store.flush()
    with _progress() as on_progress:
        manifest = create_backup(settings, Path(args.path), on_progress=on_progress)
    if args.json:
        print_json(manifest.as_dict())
    else:
        print(_describe(args.path, manifest))
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    with _progress() as on_progress:
        manifest = verify_backup(Path(args.path), on_progress=on_progress)
    if args.json:
        print_json(manifest.as_dict())
    else:
        print(f"{_describe(args.path, manifest)}\nverified: counts and hash match")
    return 0


def _restore(args: argparse.Namespace, settings: Settings) -> int:
    keys = PostgresKeyStore(args.keys_from) if args.keys_from else None
    try:
        with _progress() as on_progress:
            report = restore_backup(Path(args.path), settings, keys=keys, on_progress=on_progress)
    finally:
        if keys is not None:
            keys.close()
    if args.json:
        print_json(asdict(report))
        return 0
    print(report)
    if keys is None:
        print("no keys copied: personal fields decrypt only where this database's keyring holds their keys "
              "(use --keys-from DATABASE_URL to copy the live keyring's wrapped keys and tombstones)")
    if report.incomplete_streams:
        print(f"warning: {len(report.incomplete_streams)} streams lack early versions (the backup did not start at "
              f"offset 0): {', '.join(report.incomplete_streams[:5])}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("backup", help="back up the event log to one file, verify it, restore it")
    group = parser.add_subparsers(dest="backup_command", metavar="ACTION", required=True)

    create = group.add_parser("create", help="pin the log's end offsets and write the events and schemas to PATH")
    create.add_argument("--no-flush", action="store_true", help="do not publish the outbox first (Kafka only)")
    create.set_defaults(func=_create)

    verify = group.add_parser("verify", help="re-read PATH and check its counts and sha256")
    verify.set_defaults(func=_verify)

    restore = group.add_parser("restore", help="restore PATH into an empty topic and database (these settings)")
    restore.add_argument("--keys-from", metavar="DATABASE_URL",
                         help="copy wrapped data keys and tombstones from this database's keyring")
    restore.set_defaults(func=_restore)

    for action in (create, verify, restore):
        action.add_argument("path", metavar="PATH")
        action.add_argument("--json", action="store_true", help="machine-readable output")
