"""``evp registry serve`` and ``evp registry subjects``."""

from __future__ import annotations

import argparse
import signal
import threading

from events.cli.common import print_json, print_table
from events.errors import ConfigurationError
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.schema.registry_http import DEFAULT_PORT, RegistryApi, RegistryHttpServer, serving
from events.settings import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log = KafkaSchemaLog(settings)
    try:
        registry = SchemaRegistry(log)
        known = len(registry.subjects())  # read the log now: a broken broker fails here, not on a client
        try:
            server = RegistryHttpServer(RegistryApi(registry), args.host, args.port)
        except OSError as err:
            raise ConfigurationError(f"--host {args.host} --port {args.port}: cannot listen: {err}") from err
        with serving(server):
            print(f"registry: serving {settings.schemas_topic} ({known} subjects) on {server.url}", flush=True)
            stop.wait()
    finally:
        log.close()
    print("registry: stopped", flush=True)
    return 0


def _subjects(args: argparse.Namespace, settings: Settings) -> int:
    log = KafkaSchemaLog(settings)
    try:
        registry = SchemaRegistry(log)
        rows = [
            {"subject": subject, "versions": [e.version for e in history], "ids": [e.id for e in history]}
            for subject in registry.subjects()
            for history in [registry.versions(subject)]
        ]
    finally:
        log.close()
    if args.json:
        print_json(rows)
    elif not rows:
        print(f"no subjects in {settings.schemas_topic}")
    else:
        print_table([{"subject": r["subject"], "versions": ",".join(map(str, r["versions"])),
                      "ids": ",".join(map(str, r["ids"]))} for r in rows], ("subject", "versions", "ids"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("registry", help="the schema registry and its Confluent-compatible REST API")
    group = parser.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    serve = group.add_parser("serve", help="answer the Confluent Schema Registry REST subset until SIGTERM")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    serve.set_defaults(func=_serve)
    subjects = group.add_parser("subjects", help="every subject with its versions and schema ids")
    subjects.add_argument("--json", action="store_true")
    subjects.set_defaults(func=_subjects)
