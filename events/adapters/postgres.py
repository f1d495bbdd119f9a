"""PostgreSQL access: connections with errors translated once, and idempotent migrations."""

from __future__ import annotations

import hashlib
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


#: Which schema scripts this database has run, by name, with the digest of the text that ran.
_MIGRATIONS_DDL = """CREATE TABLE IF NOT EXISTS public.evp_migrations (
    name text PRIMARY KEY, sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""


def apply_once(conn: psycopg.Connection, name: str, script: str) -> bool:
    """Run the idempotent DDL ``script`` unless this database ran this very text under ``name``.

    1. if ``public.evp_migrations`` records ``name`` with the script's sha256, return False
       having taken no lock: an ``ALTER TABLE ... IF NOT EXISTS`` takes ACCESS EXCLUSIVE
       even when it changes nothing, so running the scripts at every start queued each
       append behind any long read, and deadlocked with a publishing relay;
    2. otherwise, in one transaction under :func:`migration_lock`: make the table, look
       again (another process may have just run it), run the script, record its digest;
       True when it ran.
    """
    digest = hashlib.sha256(script.encode()).hexdigest()

    def recorded() -> bool:
        if conn.execute("SELECT to_regclass('public.evp_migrations') IS NULL").fetchone() == (True,):
            return False
        row = conn.execute("SELECT sha256 FROM public.evp_migrations WHERE name = %s", (name,)).fetchone()
        return row is not None and row[0] == digest

    if recorded():
        return False
    with conn.transaction():
        migration_lock(conn)
        if recorded():
            return False
        conn.execute(_MIGRATIONS_DDL)
        conn.execute(script)
        conn.execute("INSERT INTO public.evp_migrations (name, sha256) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE"
                     " SET sha256 = excluded.sha256, applied_at = now()", (name, digest))
    return True


def migrate(conn: psycopg.Connection, packages: Iterable[str] = ("events.store",)) -> None:
    """Bring each package's schema up to date: its ``sql/*.sql`` files, in name order, as one :func:`apply_once`."""
    for package in packages:
        folder = resources.files(package) / "sql"
        scripts = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
        apply_once(conn, package, "\n".join(script.read_text() for script in scripts))
