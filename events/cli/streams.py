"""``evp streams show ID``: a stream's version and events."""

from __future__ import annotations

import argparse

from events.ops.audit import stream_history, summarize
from events.cli.common import add_point_options, point_of, print_json, print_table
from events.store.client import EventStore
from events.settings import Settings


def _show(args: argparse.Namespace, settings: Settings) -> int:
    position, as_of = point_of(args)
    past = position is not None or as_of is not None
    with EventStore.open(settings) as store:
        entries = stream_history(store, args.id, decrypt=args.decrypt, position=position, as_of=as_of)
        version = entries[-1].version if past else store.ledger.version(args.id)
    then = max(e.position for e in entries) if past else None
    if args.json:
        print_json({"stream_id": args.id, "version": version, "as_of_position": then,
                    "events": [e.as_dict() for e in entries]})
        return 0
    asked = f"position {position}" if position is not None else f"{args.as_of}"
    print(f"stream {args.id}: version {version}" + ("" if then is None else
          f" as of {asked} (its last event then is at ledger position {then})"))
    rows = [{"version": e.version, "event_type": e.event_type, "actor": e.actor, "event_id": e.event_id,
             "kafka": e.kafka, "data": summarize(e.data)} for e in entries]
    print_table(rows, ("version", "event_type", "actor", "event_id", "kafka", "data"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("streams", help="inspect streams in the ledger")
    group = parser.add_subparsers(dest="streams_command", metavar="ACTION", required=True)
    show = group.add_parser("show", help="a stream's version and events")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--decrypt", action="store_true", help="decrypt personal fields (needs the keyring)")
    add_point_options(show, "the stream")
    show.set_defaults(func=_show)
