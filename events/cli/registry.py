"""``evp registry serve`` and ``evp registry subjects``."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import stat
import threading
from pathlib import Path

from events.cli.common import print_json, print_table
from events.errors import ConfigurationError
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.schema.registry_http import DEFAULT_PORT, RegistryApi, RegistryHttpServer, WritePolicy, serving
from events.settings import Settings

#: Seconds a server's reads of subjects and versions may answer from what it read last.
READ_REFRESH_S = 1.0


def token_path(settings: Settings) -> Path:
    """Where ``evp registry serve --allow-writes`` keeps the token it generates."""
    return settings.home / "registry" / "token"


def read_token(path: Path) -> str:
    """The write token in ``path``, a file only its owner may read; ConfigurationError naming what is wrong."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(f"token file {path} has mode {stat.S_IMODE(mode):04o}: others may read it; "
                                     f"run chmod 600 {path}")
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigurationError(f"token file {path} cannot be read: {err.strerror or err}") from err
    if len(token) < 16:
        raise ConfigurationError(f"token file {path} holds {len(token)} characters; a token needs at least 16")
    return token


def ensure_token(path: Path) -> str:
    """The token in ``path``, generated into it first (mode 0600, folder 0700) if the file does not exist."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return read_token(path)  # another server made it first
        except OSError as err:
            raise ConfigurationError(f"token file {path} cannot be created: {err.strerror or err}") from err
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    return read_token(path)


def _policy(args: argparse.Namespace, settings: Settings) -> tuple[WritePolicy | None, Path | None]:
    if not args.allow_writes:
        if args.token_file is not None:
            raise ConfigurationError("--token-file is for writes: add --allow-writes, or leave it out to serve read-only")
        return None, None
    if args.token_file is not None:
        return WritePolicy(read_token(args.token_file)), args.token_file
    path = token_path(settings)
    return WritePolicy(ensure_token(path)), path


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    policy, token_file = _policy(args, settings)
    log = KafkaSchemaLog(settings)
    try:
        registry = SchemaRegistry(log, refresh_interval_s=READ_REFRESH_S)
        known = len(registry.subjects())  # read the log now: a broken broker fails here, not on a client
        try:
            server = RegistryHttpServer(RegistryApi(registry, policy), args.host, args.port,
                                        extra_hosts=tuple(args.allowed_host))
        except OSError as err:
            raise ConfigurationError(f"--host {args.host} --port {args.port}: cannot listen: {err}") from err
        with serving(server):
            mode = "read-only" if token_file is None else f"writes need the bearer token in {token_file}"
            print(f"registry: serving {settings.schemas_topic} ({known} subjects) on {server.url} ({mode})",
                  flush=True)
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
    serve.add_argument("--allow-writes", action="store_true",
                       help="accept registrations from holders of the bearer token (default: read-only)")
    serve.add_argument("--token-file", type=Path, default=None,
                       help="file (mode 0600) holding the write token; default: generated into "
                            "$EVP_HOME/registry/token")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="another host name writes may use in their Host header (with the server's port)")
    serve.set_defaults(func=_serve)
    subjects = group.add_parser("subjects", help="every subject with its versions and schema ids")
    subjects.add_argument("--json", action="store_true")
    subjects.set_defaults(func=_subjects)
