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


def migration_lock(conn: psycopg.Connection) -> None:
    """Take the one advisory lock every schema change runs under (ledger, keyring, views).

    ``CREATE TABLE IF NOT EXISTS`` is not safe against itself: two sessions creating the same
    table at once fail with ``UniqueViolation`` on ``pg_type``. Serialising every migration
    of the database on one transaction-scoped lock makes concurrent starts safe. Call it
    inside the transaction that changes the schema.
    """
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))


def apply_schema(conn: psycopg.Connection, script: str) -> None:
    """Run one idempotent DDL script in its own transaction, under :func:`migration_lock`."""
    with conn.transaction():
        migration_lock(conn)
        conn.execute(script)


def migrate(conn: psycopg.Connection, packages: Iterable[str] = ("events.store",)) -> None:
    """Apply every ``sql/*.sql`` file of the given packages, in name order, in one transaction."""
    with conn.transaction():
        migration_lock(conn)
        for package in packages:
            folder = resources.files(package) / "sql"
            for script in sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name):
                conn.execute(script.read_text())
