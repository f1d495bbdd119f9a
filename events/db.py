"""PostgreSQL access: connections with errors translated once, and idempotent migrations."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

import psycopg
from psycopg.conninfo import conninfo_to_dict

from events.errors import ServiceUnavailable

_MIGRATION_LOCK = 0x65767000  # "evp\0": serialises concurrent migrations


def describe(conninfo: str) -> str:
    """``host:port/dbname`` of a connection string (URL or key=value) — never the password."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "<unparsable connection string>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"


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
