"""Database roles that can only see what their job needs, generated from the view declarations.

Encryption keeps personal data unreadable without keys; roles keep people from even
selecting the ciphertext, the blind indexes or the wrapped keys. Three roles:

- ``<prefix>projector`` keeps the views up to date. It owns every view's schema and its
  tables (the runner re-creates indexes ``IF NOT EXISTS`` on every start, which only an
  owner may do) and may read, of the keyring, only who was erased and when (the view
  ``evp_erasures.tombstones``): it has no privilege on the keyring's schema ``evp_keyring``,
  the ledger or any key.
- ``<prefix>analyst`` reads, of each view, only ``<schema>.<table>_masked``: the columns the
  view declares as ``analyst`` plus, where the view has personal columns, ``erased``; never
  a table itself, a sealed column, the ledger or the keyring.
- ``<prefix>auditor`` reads who did what and when: ``<audit>.ledger`` and the same columns
  of the ledger table (column privileges) — every column but the record ``value``; never a
  key or a view.

Role names are cluster-wide while grants are per database, hence the prefix: tests or
deployments sharing a server keep their roles apart.

Order of setup (each step idempotent):

1. open an :class:`events.store.client.EventStore` (creates the ledger and keyring tables);
2. run each view once (``ProjectionRunner.open`` or ``catch_up``) as an administrator;
3. call :func:`setup_roles` with the views' layouts (``view.layout()``) as that
   administrator (a superuser, or a role owning the tables and allowed to create roles);
   from then on the projector may run the views. Views left out keep their grants.

A rebuild swaps in a fresh views schema, which has none of the analyst's grants: pass
``before_swap=lambda: setup_roles(conn, [view.layout(shadow_name(schema))])`` to
:func:`projections.rebuild.rebuild` (grants survive the rename), or call
:func:`setup_roles` again right after it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from events.errors import ConfigurationError
from events.privacy.keyring import KEYRING_SCHEMA
from projections.view import ERASED, Layout

DEFAULT_PREFIX = "evp_"
DEFAULT_AUDIT_SCHEMA = "evp_audit"

AUDIT_VIEW = "ledger"
#: The ledger columns an auditor may read: everything except the record ``value``.
AUDIT_COLUMNS = (
    "position", "stream_id", "version", "event_id", "event_type", "actor", "subject_id",
    "occurred_at", "recorded_at", "partition", "kafka_offset",
)
#: The keyring columns the masked views need: the projector reads them through :data:`TOMBSTONES_VIEW`.
TOMBSTONE_COLUMNS = ("subject_id", "erased_at")
LEDGER_TABLE = "evp_events"
EVENT_LOG_VIEW = "evp_event_log"
KEYS_TABLE = "evp_data_keys"
#: ``evp_erasures.tombstones``: who was erased and when, owned by the keyring's owner (so it reads the
#: keyring with that role's rights), the projector's only window on the keyring, whose schema
#: (``evp_keyring``) it cannot use at all.
ERASURES_SCHEMA = "evp_erasures"
TOMBSTONES_VIEW = "tombstones"
#: Tables of the ledger and the keyring: a schema holding any of them is never a views' schema,
#: because the projector owns its views' schemas and everything in them.
PROTECTED_TABLES = (LEDGER_TABLE, KEYS_TABLE, "evp_outbox", "evp_streams", "evp_reservations", "evp_published")
#: Schemas the projector must never own, whatever they hold.
SHARED_SCHEMAS = ("public", "information_schema", KEYRING_SCHEMA, ERASURES_SCHEMA)

_MAX_IDENTIFIER = 63
_LONGEST_SUFFIX = len("projector")
_PREFIX = re.compile(r"^[a-z_][a-z0-9_]*$")
#: (keyword when wanted, keyword when not), in the column order of :func:`_ensure_role`'s query.
_ATTRIBUTES = (
    ("SUPERUSER", "NOSUPERUSER"), ("CREATEDB", "NOCREATEDB"), ("CREATEROLE", "NOCREATEROLE"),
    ("REPLICATION", "NOREPLICATION"), ("BYPASSRLS", "NOBYPASSRLS"), ("LOGIN", "NOLOGIN"),
)
#: Relation kinds whose ownership moves to the projector (indexes follow their table).
_OWNED_KINDS = ("r", "p", "v", "m", "f", "S")


@dataclass(frozen=True)
class Roles:
    """The three role names for one prefix."""

    projector: str
    analyst: str
    auditor: str

    @classmethod
    def named(cls, prefix: str = DEFAULT_PREFIX) -> Roles:
        """Validated names: lower case (unquoted SQL folds to it) and within PostgreSQL's 63 bytes."""
        if not _PREFIX.match(prefix) or len(prefix) + _LONGEST_SUFFIX > _MAX_IDENTIFIER:
            raise ConfigurationError(
                f"role prefix {prefix!r} must be lower-case letters, numbers and '_' (not starting with a digit), "
                f"at most {_MAX_IDENTIFIER - _LONGEST_SUFFIX} characters"
            )
        return cls(f"{prefix}projector", f"{prefix}analyst", f"{prefix}auditor")

    def all(self) -> tuple[str, str, str]:
        return (self.projector, self.analyst, self.auditor)


def roles_exist(conn: psycopg.Connection[Any], prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether :func:`setup_roles` ran on this server for ``prefix`` (the analyst role exists)."""
    row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (Roles.named(prefix).analyst,)).fetchone()
    return row is not None


def setup_roles(
    conn: psycopg.Connection[Any],
    views: Sequence[Layout],
    *,
    prefix: str = DEFAULT_PREFIX,
    audit_schema: str = DEFAULT_AUDIT_SCHEMA,
    login: bool = False,
) -> Roles:
    """Create (or bring back in line) the roles, masked views and grants; returns the role names.

    1. check that the ledger, the keyring and every view's table exist, and that no view's
       schema is ``public``, a system schema, the audit schema, or one holding the ledger
       or the keyring (the projector becomes the owner of its views' schemas);
    2. create the roles and pin their attributes (no superuser, no bypassing row security;
       ``login`` lets them connect themselves, otherwise an administrator uses ``SET ROLE``);
    3. revoke what PUBLIC, the analyst and the auditor may do on the ledger, keyring, audit
       and the views' schemas, so a second call also removes stale grants;
    4. (re)create each view's masked view and grant it, and only it, to the analyst;
    5. give the projector the views' schemas, the auditor the audit view.

    Runs in one transaction. Raises :class:`ConfigurationError` naming a missing table or view.
    """
    roles = Roles.named(prefix)
    if not views:
        raise ConfigurationError("setup_roles needs at least one view layout (view.layout())")
    with conn.transaction(), conn.cursor() as cur:
        ledger_schema = _schema_of(cur, LEDGER_TABLE, "open an EventStore first: it creates the ledger")
        keys_schema = _schema_of(cur, f"{KEYRING_SCHEMA}.{KEYS_TABLE}",
                                 "open an EventStore first: it creates the keyring table (EVP_KEYRING_URL must be "
                                 "this database for masked views to show erasures)")
        for layout in views:
            check_views_schema(layout.schema, audit_schema)
        _refuse_protected_schemas(cur, [layout.schema for layout in views], (ledger_schema, keys_schema))
        for layout in views:
            _require_view(cur, layout)
        for role in roles.all():
            _ensure_role(cur, role, login=login)
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(audit_schema)))
        view_schemas = tuple(dict.fromkeys(layout.schema for layout in views))
        _create_tombstones(cur, keys_schema)
        _reset(cur, roles, view_schemas, (ledger_schema, keys_schema, audit_schema, ERASURES_SCHEMA))
        masked = [m for m in (_create_masked_view(cur, layout) for layout in views) if m is not None]
        _grant_projector(cur, roles.projector, view_schemas)
        _grant_analyst(cur, roles.analyst, view_schemas, masked)
        _grant_auditor(cur, roles.auditor, ledger_schema, audit_schema)
    return roles


def drop_roles(conn: psycopg.Connection[Any], prefix: str = DEFAULT_PREFIX) -> None:
    """Drop the roles; what the projector owned (the views) passes to the current user.

    ``DROP ROLE`` fails while a role holds privileges in another database: call this in
    each database :func:`setup_roles` ran in (``REASSIGN``/``DROP OWNED`` act on the
    current one).
    """
    roles = Roles.named(prefix)
    with conn.transaction(), conn.cursor() as cur:
        for role in roles.all():
            if _role_exists(cur, role):
                cur.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(role)))
                cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# -- checks --------------------------------------------------------------------------------
def check_views_schema(schema: str, audit_schema: str = DEFAULT_AUDIT_SCHEMA) -> None:
    """ConfigurationError unless ``schema`` may belong to the projector (no database needed).

    Refuses ``public``, ``information_schema``, ``pg_*`` and the audit schema; the ledger's
    and keyring's schemas are refused by :func:`setup_roles`, which can look them up.
    """
    lowered = schema.lower()
    if lowered in SHARED_SCHEMAS or lowered.startswith("pg_") or schema == audit_schema:
        raise ConfigurationError(
            f"schema {schema!r} cannot hold a view that has roles: the projector becomes the owner of its view's "
            f"schema and of everything in it; choose a schema of the view's own (--schema NAME)"
        )


def _refuse_protected_schemas(cur: psycopg.Cursor[Any], schemas: Sequence[str], ledger_schemas: tuple[str, ...]) -> None:
    """ConfigurationError if a views' schema is, or holds, the ledger or the keyring."""
    for schema in schemas:
        if schema in ledger_schemas:
            raise ConfigurationError(
                f"schema {schema!r} holds the ledger or the keyring ({LEDGER_TABLE}, {KEYS_TABLE}): the projector would "
                "become their owner; choose a schema of the view's own (--schema NAME)"
            )
    rows = cur.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = ANY(%s) AND c.relname = ANY(%s) ORDER BY 1, 2",
        (list(schemas), list(PROTECTED_TABLES)),
    ).fetchall()
    if rows:
        schema, table = rows[0]
        raise ConfigurationError(
            f"schema {schema!r} holds {table}, a table of evp's ledger or keyring: the projector would become its "
            "owner; choose a schema of the view's own (--schema NAME)"
        )


def _schema_of(cur: psycopg.Cursor[Any], table: str, hint: str) -> str:
    """The schema the search path finds ``table`` in."""
    row = cur.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (table,),
    ).fetchone()
    if row is None:
        raise ConfigurationError(f"table {table} does not exist in this database: {hint}")
    return str(row[0])


def _require_view(cur: psycopg.Cursor[Any], layout: Layout) -> None:
    found = cur.execute("SELECT to_regclass(%s)", (sql.Identifier(layout.schema, layout.table).as_string(cur),)).fetchone()
    if found is None or found[0] is None:
        raise ConfigurationError(
            f"table {layout.schema}.{layout.table} does not exist: run the view {layout.view!r} into schema "
            f"{layout.schema!r} (evp projections catch-up {layout.view}) before setting up roles"
        )


def _role_exists(cur: psycopg.Cursor[Any], role: str) -> bool:
    return cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def _database(cur: psycopg.Cursor[Any]) -> sql.Identifier:
    return sql.Identifier(str(cur.execute("SELECT current_database()").fetchone()[0]))  # type: ignore[index]


# -- steps ---------------------------------------------------------------------------------
def _ensure_role(cur: psycopg.Cursor[Any], role: str, *, login: bool) -> None:
    """Create the role if absent (another database's setup may race us), then pin its attributes.

    The attributes are re-applied to an existing role too, so a role that was given more
    power by hand (superuser, bypassing row security) is brought back to none.
    """
    name = sql.Identifier(role)
    if not _role_exists(cur, role):
        try:
            with cur.connection.transaction():
                cur.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(name))
        except pg_errors.DuplicateObject:
            pass  # created concurrently: the same role
    row = cur.execute(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin FROM pg_roles"
        " WHERE rolname = %s",
        (role,),
    ).fetchone()
    assert row is not None
    wanted = (False, False, False, False, False, login)
    # Only what differs: changing REPLICATION or BYPASSRLS needs a superuser, even as a no-op.
    changes = [yes if want else no for have, want, (yes, no) in zip(row, wanted, _ATTRIBUTES) if bool(have) != want]
    if changes:
        cur.execute(sql.SQL("ALTER ROLE {} " + " ".join(changes)).format(name))


def _reset(cur: psycopg.Cursor[Any], roles: Roles, view_schemas: tuple[str, ...], other_schemas: tuple[str, ...]) -> None:
    """Revoke what PUBLIC and our roles could reach, so only the grants below remain.

    In the views' schemas the projector is (or becomes) the owner: revoking from an owner
    would strip its own rights, so it is left out there.
    """
    everyone = sql.SQL(", ").join([sql.SQL("PUBLIC"), *(sql.Identifier(r) for r in roles.all())])
    readers = sql.SQL(", ").join([sql.SQL("PUBLIC"), sql.Identifier(roles.analyst), sql.Identifier(roles.auditor)])
    # Before PostgreSQL 15 anyone may create objects in `public`: a planted table or
    # function there could shadow ours for a careless search path.
    cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    for schema, grantees in [(s, everyone) for s in sorted(set(other_schemas))] + [(v, readers) for v in view_schemas]:
        s = sql.Identifier(schema)
        cur.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, grantees))
        cur.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(s, grantees))
        if schema == "public":  # PUBLIC keeps USAGE on `public`: other applications may rely on it
            ours = sql.SQL(", ").join(sql.Identifier(r) for r in roles.all())
            cur.execute(sql.SQL("REVOKE ALL ON SCHEMA public FROM {}").format(ours))
        else:
            cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(s, grantees))


def _create_tombstones(cur: psycopg.Cursor[Any], keys_schema: str) -> None:
    """(Re)create ``evp_erasures.tombstones``, owned (with its schema) by the keyring table's owner."""
    keys = sql.Identifier(keys_schema, KEYS_TABLE)
    owner = cur.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass",
                        (keys.as_string(cur),)).fetchone()
    assert owner is not None
    schema, view, role = sql.Identifier(ERASURES_SCHEMA), sql.Identifier(ERASURES_SCHEMA, TOMBSTONES_VIEW), sql.Identifier(owner[0])
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    cur.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(schema, role))
    cur.execute(sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT {} FROM {} WHERE erased_at IS NOT NULL").format(
        view, sql.SQL(", ").join(map(sql.Identifier, TOMBSTONE_COLUMNS)), keys))
    cur.execute(sql.SQL("ALTER VIEW {} OWNER TO {}").format(view, role))


def _create_masked_view(cur: psycopg.Cursor[Any], layout: Layout) -> sql.Identifier | None:
    """``<table>_masked``: the analyst columns, plus ``erased`` where there are personal columns.

    ``erased`` is the row's own redaction flag or the keyring's tombstone of any subject the
    row names: an erasure shows at once, before the runner has redacted the row. The view
    runs with its owner's rights (the projector, once ownership moves), so the analyst
    learns who was erased without any privilege on the keyring table. A view with neither
    analyst nor personal columns gets no masked view. Returns the masked view, if any.
    """
    view = sql.Identifier(layout.schema, layout.masked)
    cur.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(view))  # its columns may have changed
    selected = [sql.SQL("a.{}").format(sql.Identifier(c)) for c in layout.analyst]
    if layout.personal:
        keys = sql.Identifier(ERASURES_SCHEMA, TOMBSTONES_VIEW)
        tombstones = [
            sql.SQL("EXISTS (SELECT 1 FROM {} k WHERE k.subject_id = a.{} AND k.erased_at IS NOT NULL)").format(
                keys, sql.Identifier(subject))
            for subject in layout.subjects()
        ]
        erased = sql.SQL(" OR ").join([sql.SQL("a.{}").format(sql.Identifier(ERASED)), *tombstones])
        selected.append(sql.SQL("({}) AS {}").format(erased, sql.Identifier(ERASED)))
    if not selected:
        return None
    cur.execute(sql.SQL("CREATE VIEW {} AS SELECT {} FROM {} a").format(
        view, sql.SQL(", ").join(selected), sql.Identifier(layout.schema, layout.table)))
    cur.execute(sql.SQL("COMMENT ON VIEW {} IS {}").format(view, sql.Literal(
        f"View {layout.view!r} for analysts: only its analyst columns"
        + ("; erased: some personal data of the row was erased." if layout.personal else ".")
    )))
    return view


def _grant_projector(cur: psycopg.Cursor[Any], role: str, view_schemas: tuple[str, ...]) -> None:
    """Own the views' schemas and everything in them; read the tombstones view, nothing of the keyring.

    ``CREATE`` on the database lets the runner's ``CREATE SCHEMA IF NOT EXISTS`` pass (the
    privilege is checked even when the schema exists) and lets a rebuild make its shadow.
    """
    r = sql.Identifier(role)
    for views_schema in view_schemas:
        cur.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(views_schema), r))
        relations = cur.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind = ANY(%s) AND pg_get_userbyid(c.relowner) <> %s"
            # a serial column's sequence follows its table and cannot be moved on its own
            " AND (c.relkind <> 'S' OR NOT EXISTS (SELECT 1 FROM pg_depend d"
            " WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')))",
            (views_schema, list(_OWNED_KINDS), role),
        ).fetchall()
        for name, kind in relations:
            keyword = {"v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE", "S": "SEQUENCE"}.get(kind, "TABLE")
            cur.execute(sql.SQL("ALTER " + keyword + " {} OWNER TO {}").format(sql.Identifier(views_schema, name), r))
    cur.execute(sql.SQL("GRANT CONNECT, CREATE ON DATABASE {} TO {}").format(_database(cur), r))
    # evp's own role (the database's owner, no superuser) runs the views and rebuilds them: it
    # acts as the projector. No escalation: it owns the ledger and the keyring already.
    owner = cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()").fetchone()
    assert owner is not None
    if owner[0] != role:
        cur.execute(sql.SQL("GRANT {} TO {}").format(r, sql.Identifier(owner[0])))
    cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(ERASURES_SCHEMA), r))
    cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(ERASURES_SCHEMA, TOMBSTONES_VIEW), r))


def _grant_analyst(cur: psycopg.Cursor[Any], role: str, view_schemas: tuple[str, ...], masked: Sequence[sql.Identifier]) -> None:
    r = sql.Identifier(role)
    cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(_database(cur), r))
    for views_schema in view_schemas:
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(views_schema), r))
    for view in masked:
        cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(view, r))


def _grant_auditor(cur: psycopg.Cursor[Any], role: str, ledger_schema: str, audit_schema: str) -> None:
    """The audit view, plus the same columns of the ledger table: the record value stays out of reach."""
    r = sql.Identifier(role)
    columns = sql.SQL(", ").join(map(sql.Identifier, AUDIT_COLUMNS))
    ledger = sql.Identifier(ledger_schema, LEDGER_TABLE)
    log_view = sql.Identifier(ledger_schema, EVENT_LOG_VIEW)  # the events with their Kafka offsets
    view = sql.Identifier(audit_schema, AUDIT_VIEW)
    cur.execute(sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT {} FROM {}").format(view, columns, log_view))
    cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(_database(cur), r))
    cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(audit_schema), r))
    cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(view, r))
    cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(ledger_schema), r))
    cur.execute(sql.SQL("GRANT SELECT ({}) ON {} TO {}").format(columns, ledger, r))
