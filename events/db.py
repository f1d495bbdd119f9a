"""PostgreSQL access: connections with errors translated once, and idempotent migrations."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from urllib.parse import urlsplit

import psycopg

from events.errors import ServiceUnavailable

_MIGRATION_LOCK = 0x65767000  # "evp\0": serialises concurrent migrations


def describe(conninfo: str) -> str:
    """host:port/db of a connection string, without credentials, for error messages."""
    parts = urlsplit(conninfo)
    if parts.scheme.startswith("postgres"):
        return f"{parts.hostname}:{parts.port or 5432}{parts.path or '/'}"
    return "(connection string)"


def connect(conninfo: str, *, autocommit: bool = False, connect_timeout: int = 10) -> psycopg.Connection:
    """Open a connection, or raise ServiceUnavailable naming the server."""
    try:
        return psycopg.connect(conninfo, autocommit=autocommit, connect_timeout=connect_timeout)
    except psycopg.OperationalError as err:
        raise ServiceUnavailable("postgresql", describe(conninfo), str(err).strip().splitlines()[0]) from err


def migrate(conn: psycopg.Connection, packages: Iterable[str] = ("events",)) -> None:
    """Apply every ``sql/*.sql`` file of the given packages, in name order, in one transaction."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        for package in packages:
            folder = resources.files(package) / "sql"
            for script in sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name):
                conn.execute(script.read_text())  # type: ignore[arg-type]
