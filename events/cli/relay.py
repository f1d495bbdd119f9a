"""``evp relay run`` and ``evp relay status``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from events.adapters import postgres
from events.cli.common import print_json
from events.store.relay import Relay, relay_status
from events.settings import Settings


def _run(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    relay = Relay(settings)
    print(f"relay: publishing the outbox to {settings.events_topic} on {settings.kafka}", flush=True)
    try:
        relay.run(stop)
    finally:
        relay.close()
    print(f"relay: stopped after publishing {relay.published} events", flush=True)
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        postgres.migrate(conn)
        status = relay_status(conn, settings.events_topic)
    if args.json:
        print_json(status.__dict__)
        return 0
    age = "-" if status.oldest_age_seconds is None else f"{status.oldest_age_seconds:.1f}s"
    print(f"outbox depth {status.outbox_depth}, oldest unpublished {age}")
    for partition in range(settings.partitions):
        holder = status.lease_holders.get(partition)
        who = f"held by backend pid {holder}" if holder else "free"
        print(f"  partition {partition}: {status.depth_by_partition.get(partition, 0)} waiting, lease {who}")
    sys.stdout.flush()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("relay", help="publish the transactional outbox to Kafka")
    group = parser.add_subparsers(dest="relay_command", metavar="ACTION", required=True)
    group.add_parser("run", help="publish continuously until SIGTERM").set_defaults(func=_run)
    status = group.add_parser("status", help="outbox depth, lag and lease holders")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)
