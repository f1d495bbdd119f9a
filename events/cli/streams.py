"""``evp streams show ID``: a stream's version and events."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from events.errors import ConfigurationError
from events.ops.audit import stream_history, summarize
from events.cli.common import print_json, print_table
from events.store.client import EventStore
from events.settings import Settings


def _show(args: argparse.Namespace, settings: Settings) -> int:
    as_of = _time(args.as_of) if args.as_of else None
    with EventStore.open(settings) as store:
        entries = stream_history(store, args.id, decrypt=args.decrypt, position=args.position, as_of=as_of)
        version = store.ledger.version(args.id) if args.position is None and as_of is None else entries[-1].version
    then = None if args.position is None and as_of is None else max(e.position for e in entries)
    if args.json:
        print_json({"stream_id": args.id, "version": version, "as_of_position": then,
                    "events": [e.as_dict() for e in entries]})
        return 0
    asked = f"position {args.position}" if args.position is not None else f"{args.as_of}"
    print(f"stream {args.id}: version {version}" + ("" if then is None else
          f" as of {asked} (its last event then is at ledger position {then})"))
    rows = [{"version": e.version, "event_type": e.event_type, "actor": e.actor, "event_id": e.event_id,
             "kafka": e.kafka, "data": summarize(e.data)} for e in entries]
    print_table(rows, ("version", "event_type", "actor", "event_id", "kafka", "data"))
    return 0


def _time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise ConfigurationError(f"--as-of {text!r} is not an ISO 8601 time (for example 2026-12-01T15:30:00+00:00)") from err
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("streams", help="inspect streams in the ledger")
    group = parser.add_subparsers(dest="streams_command", metavar="ACTION", required=True)
    show = group.add_parser("show", help="a stream's version and events")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--decrypt", action="store_true", help="decrypt personal fields (needs the keyring)")
    when = show.add_mutually_exclusive_group()
    when.add_argument("--position", type=int, help="the stream as it was at this ledger position")
    when.add_argument("--as-of", help="the stream as it was at this time (ISO 8601; events recorded at or before it)")
    show.set_defaults(func=_show)
