"""``evp forget SUBJECT`` and ``evp forget --dry-run SUBJECT``."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from events.cli.common import print_json
from events.store.client import EventStore
from events.ops.forget import forget_subject
from events.settings import Settings


def _forget(args: argparse.Namespace, settings: Settings) -> int:
    with EventStore.open(settings) as store:
        report = forget_subject(store, args.subject, reason=args.reason, dry_run=args.dry_run)
    if args.json:
        print_json(asdict(report))
        return 0
    print(report)
    for stream in report.streams:
        print(f"  stream   {stream}")
    for snapshot in report.snapshots:
        print(f"  snapshot {snapshot} (its shards hold no personal data; its features and labels stay usable)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("forget", help="erase a data subject by destroying their data key")
    parser.add_argument("subject")
    parser.add_argument("--reason", default="erasure request", help="recorded with the erasure (no personal data)")
    parser.add_argument("--dry-run", action="store_true", help="report what the erasure touches; change nothing")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_forget)
