"""Database roles generated from the view declarations: a role that must not see a column cannot select it.

Each role is checked two ways: concrete queries that must fail with
``InsufficientPrivilege`` (or succeed), and the complete list of columns PostgreSQL says
the role may read in the database's own schemas, which must equal the intended one — so a
forgotten grant or a stray ``GRANT ... TO PUBLIC`` anywhere shows up.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import pytest

from events.errors import ConfigurationError
from events.event import Event
from events.ops.forget import forget_subject
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from projections.declarations import load_view
from projections.rebuild import rebuild, shadow_name
from projections.roles import AUDIT_COLUMNS, Roles, drop_roles, setup_roles
from projections.runner import ProjectionRunner
from projections.view import View
from tests.support.examples import DIGITS
from tests.support.plaintext import Person, make_people, register, submit, with_role

AUDIT = "evp_audit"
SAMPLES = load_view(Project.read(DIGITS), "samples")
ANNOTATORS = load_view(Project.read(DIGITS), "annotators")
VIEWS = (SAMPLES, ANNOTATORS)
S, A = SAMPLES.default_schema, ANNOTATORS.default_schema
MASKED_ANNOTATORS = ["annotator_id", "registered_at", "erased"]
#: Columns that hold personal data (sealed), its provenance, or are derived from it (the blind index).
PERSONAL_COLUMNS = {"name", "email", "name_event_id", "email_event_id", "email_index"}


def _catch_up(settings: Settings, views: tuple[View, ...] = VIEWS) -> None:
    for view in views:
        with ProjectionRunner(settings, view) as runner:
            runner.catch_up()


@pytest.fixture
def prefix(settings: Settings) -> Iterator[str]:
    """A role prefix private to this test; the roles are dropped afterwards."""
    name = f"{settings.topic_prefix.lower()}_"
    yield name
    with psycopg.connect(admin_url(settings), autocommit=True) as conn:
        drop_roles(conn, name)


@pytest.fixture
def people(store: EventStore, settings: Settings) -> list[Person]:
    """Two annotators with three samples each, projected into both views."""
    people = make_people(random.Random(), 2)
    for i, person in enumerate(people):
        register(store, person)
        submit(store, person, [f"{person.annotator_id}-{n}" for n in range(3)], f"digits:{i}")
    store.flush()
    _catch_up(settings)
    return people


@pytest.fixture
def roles(settings: Settings, people: list[Person], prefix: str) -> Roles:
    with psycopg.connect(admin_url(settings), autocommit=True) as conn:
        return setup_roles(conn, [v.layout() for v in VIEWS], prefix=prefix)


def admin_url(settings: Settings) -> str:
    """The administrator on the test's database: setting up roles, and ``SET ROLE`` to any of them."""
    return settings.admin_url("the role tests")


def as_role(settings: Settings, role: str) -> psycopg.Connection[Any]:
    return psycopg.connect(with_role(admin_url(settings), role), autocommit=True)


def readable_columns(conn: psycopg.Connection[Any], role: str) -> set[str]:
    """``schema.table.column`` for every column ``role`` may SELECT outside the system catalogs."""
    rows = conn.execute(
        "SELECT n.nspname || '.' || c.relname || '.' || a.attname FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid"
        " WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%%'"
        " AND has_schema_privilege(%s, n.oid, 'USAGE') AND has_column_privilege(%s, c.oid, a.attnum, 'SELECT')",
        (role, role),
    ).fetchall()
    return {r[0] for r in rows}


def assert_denied(conn: psycopg.Connection[Any], query: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(query)


def masked_columns() -> set[str]:
    """Exactly what the analyst may read: each view's analyst columns, plus erased where personal."""
    return ({f"{S}.samples_masked.{c}" for c in SAMPLES.analyst}
            | {f"{A}.annotators_masked.{c}" for c in MASKED_ANNOTATORS})


pytestmark = pytest.mark.services


def test_analyst_reads_only_the_masked_views(settings: Settings, roles: Roles, people: list[Person], store: EventStore) -> None:
    with as_role(settings, roles.analyst) as conn:
        for query in (
            f"SELECT name FROM {A}.annotators",
            f"SELECT email FROM {A}.annotators",
            f"SELECT email_index FROM {A}.annotators",
            f"SELECT annotator_id FROM {A}.annotators",
            f"SELECT * FROM {S}.samples",
            f"SELECT * FROM {A}.evp_forgotten_subjects",
            "SELECT * FROM evp_keyring.evp_data_keys",
            "SELECT subject_id FROM evp_keyring.evp_data_keys",
            "SELECT value FROM evp_events",
            "SELECT position FROM evp_events",
            f"SELECT * FROM {AUDIT}.ledger",
            f"SELECT * FROM {S}.evp_offsets",
            "CREATE TABLE public.planted (x int)",
        ):
            assert_denied(conn, query)
        cur = conn.execute(f"SELECT * FROM {A}.annotators_masked ORDER BY annotator_id")
        assert [d.name for d in cur.description or []] == MASKED_ANNOTATORS
        assert len(cur.fetchall()) == 2
        assert conn.execute(f"SELECT bool_or(erased) FROM {A}.annotators_masked").fetchone() == (False,)
        cur = conn.execute(f"SELECT * FROM {S}.samples_masked")
        assert [d.name for d in cur.description or []] == list(SAMPLES.analyst) and len(cur.fetchall()) == 6

    forget_subject(store, people[0].annotator_id, reason="request")
    with as_role(settings, roles.analyst) as conn:  # the keyring's tombstone shows at once, before the runner ran
        erased = dict(conn.execute(f"SELECT annotator_id, erased FROM {A}.annotators_masked").fetchall())
    assert erased == {people[0].annotator_id: True, people[1].annotator_id: False}
    _catch_up(settings, (ANNOTATORS,))
    with psycopg.connect(admin_url(settings)) as admin:
        redacted = admin.execute(f"SELECT erased, name IS NULL, email IS NULL FROM {A}.annotators WHERE annotator_id = %s",
                                 (people[0].annotator_id,)).fetchone()
        assert redacted == (True, True, True)
        readable = readable_columns(admin, roles.analyst)
    assert readable == masked_columns()
    assert not {c.rsplit(".", 1)[1] for c in readable} & PERSONAL_COLUMNS


def test_auditor_reads_the_ledger_but_not_values_keys_or_views(settings: Settings, roles: Roles) -> None:
    with as_role(settings, roles.auditor) as conn:
        audited = conn.execute(f"SELECT position, event_type, subject_id FROM {AUDIT}.ledger ORDER BY position").fetchall()
        direct = conn.execute("SELECT position, event_type, subject_id FROM evp_events ORDER BY position").fetchall()
        assert audited == direct and len(audited) == 2 + 6
        for query in (
            "SELECT value FROM evp_events",
            "SELECT * FROM evp_events",
            "SELECT wrapped_key FROM evp_keyring.evp_data_keys",
            "SELECT subject_id FROM evp_keyring.evp_data_keys",
            "SELECT * FROM evp_erasures.tombstones",
            f"SELECT * FROM {S}.samples_masked",
            f"SELECT * FROM {A}.annotators_masked",
        ):
            assert_denied(conn, query)
    with psycopg.connect(admin_url(settings)) as admin:
        expected = {f"{AUDIT}.ledger.{c}" for c in AUDIT_COLUMNS} | {f"public.evp_events.{c}" for c in AUDIT_COLUMNS}
        assert readable_columns(admin, roles.auditor) == expected


def test_projector_runs_the_views_but_reads_no_ledger_or_keys(
    settings: Settings, roles: Roles, store: EventStore, people: list[Person]
) -> None:
    submit(store, people[1], ["late-sample"], "digits:late")
    store.flush()
    as_projector = settings.with_(database_url=with_role(admin_url(settings), roles.projector))
    for view in VIEWS:
        with ProjectionRunner(as_projector, view) as runner:
            assert runner.catch_up().applied == 1
    with as_role(settings, roles.projector) as conn:
        assert conn.execute(f"SELECT count(*) FROM {S}.samples WHERE sample_id = 'late-sample'").fetchone() == (1,)
        for query in ("SELECT value FROM evp_events", "SELECT wrapped_key FROM evp_keyring.evp_data_keys",
                      "SELECT subject_id, erased_at FROM evp_keyring.evp_data_keys", f"SELECT * FROM {AUDIT}.ledger"):
            assert_denied(conn, query)
        assert conn.execute("SELECT count(*) FROM evp_erasures.tombstones").fetchone() == (0,)
        readable = readable_columns(conn, roles.projector)
    outside = {c for c in readable if not c.startswith((f"{S}.", f"{A}."))}
    assert outside == {"evp_erasures.tombstones.subject_id", "evp_erasures.tombstones.erased_at"}


def test_setup_is_idempotent_and_removes_stale_grants(settings: Settings, roles: Roles) -> None:
    with psycopg.connect(admin_url(settings), autocommit=True) as admin:
        before = {r: readable_columns(admin, r) for r in roles.all()}
        admin.execute(f"GRANT SELECT ON {A}.annotators TO {roles.analyst}")
        admin.execute(f"GRANT SELECT ON {S}.samples TO PUBLIC")
        admin.execute("GRANT SELECT ON evp_keyring.evp_data_keys TO PUBLIC")
        admin.execute(f"ALTER ROLE {roles.auditor} BYPASSRLS CREATEDB")
        assert f"{A}.annotators.name" in readable_columns(admin, roles.analyst)  # the stale grant took

        assert setup_roles(admin, [v.layout() for v in VIEWS], prefix=roles.analyst.removesuffix("analyst")) == roles
        assert {r: readable_columns(admin, r) for r in roles.all()} == before
        flags = admin.execute("SELECT rolbypassrls, rolcreatedb, rolcanlogin FROM pg_roles WHERE rolname = %s",
                              (roles.auditor,)).fetchone()
        assert flags == (False, False, False)


def test_grants_survive_a_rebuild_when_set_up_before_the_swap(settings: Settings, roles: Roles, people: list[Person]) -> None:
    with psycopg.connect(admin_url(settings), autocommit=True) as admin:
        prefix = roles.analyst.removesuffix("analyst")
        shadow = [ANNOTATORS.layout(shadow_name(A))]

        def regrant() -> None:
            setup_roles(admin, shadow, prefix=prefix)

        result = rebuild(settings, ANNOTATORS, before_swap=regrant)
        assert result.rows == {"annotators": 2}
        assert readable_columns(admin, roles.analyst) == masked_columns()
    with as_role(settings, roles.analyst) as conn:
        assert len(conn.execute(f"SELECT * FROM {A}.annotators_masked").fetchall()) == 2
        assert_denied(conn, f"SELECT name FROM {A}.annotators")


def test_setup_before_the_projection_names_the_missing_view(settings: Settings, store: EventStore, prefix: str) -> None:
    store.append("sample-x", Event("SampleSubmitted", {"sample_id": "x", "annotator_id": "a", "features": [0.0] * 64, "label": 1}))
    with psycopg.connect(admin_url(settings), autocommit=True) as conn:
        with pytest.raises(ConfigurationError, match=f"{S}.samples does not exist: run the view 'samples'"):
            setup_roles(conn, [SAMPLES.layout()], prefix=prefix)
        with pytest.raises(ConfigurationError, match="at least one view"):
            setup_roles(conn, [], prefix=prefix)


@pytest.mark.parametrize("bad", ["Evp_", "1evp_", "evp-", "x" * 60, ""])
def test_role_prefixes_are_checked(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="role prefix"):
        Roles.named(bad)


def test_grant_and_rebuild_commands_keep_the_analyst_on_masked_views_only(
    settings: Settings, people: list[Person], prefix: str
) -> None:
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    for command in (["grant", "samples"], ["grant", "annotators"], ["rebuild", "samples"]):
        result = subprocess.run([sys.executable, "-m", "projections.cli", *command, "--role-prefix", prefix],
                                capture_output=True, text=True, env=env, timeout=180)
        assert result.returncode == 0, result.stderr
    analyst = Roles.named(prefix).analyst
    with as_role(settings, analyst) as conn:
        assert conn.execute(f"SELECT count(*) FROM {S}.samples_masked").fetchone() == (6,)
        assert_denied(conn, f"SELECT * FROM {S}.samples")
        assert_denied(conn, f"SELECT name FROM {A}.annotators")
    with psycopg.connect(admin_url(settings)) as admin:
        assert readable_columns(admin, analyst) == masked_columns()


def test_grant_refuses_public_and_the_ledgers_or_keyrings_schema(settings: Settings, store: EventStore, prefix: str) -> None:
    """The projector owns its views' schemas: never one holding the ledger, the keyring or anyone's tables."""
    with psycopg.connect(admin_url(settings), autocommit=True) as conn:
        owner_before = conn.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'").fetchone()
        for schema in ("public", AUDIT, "pg_catalog", "evp_keyring", "evp_erasures"):
            with pytest.raises(ConfigurationError, match=rf"schema '{schema}' cannot hold a view that has roles"):
                setup_roles(conn, [SAMPLES.layout(schema)], prefix=prefix)
        # a schema holding a copy of the keyring (or the ledger) is refused by what it holds
        conn.execute("CREATE SCHEMA keys_copy")
        conn.execute("CREATE TABLE keys_copy.evp_data_keys (LIKE evp_keyring.evp_data_keys)")
        with pytest.raises(ConfigurationError, match=r"schema 'keys_copy' holds evp_data_keys"):
            setup_roles(conn, [SAMPLES.layout("keys_copy")], prefix=prefix)
        ledger_schema = conn.execute("SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                                     " WHERE c.oid = to_regclass('evp_events')").fetchone()
        assert ledger_schema is not None
        conn.execute(f'CREATE TABLE IF NOT EXISTS "{ledger_schema[0]}".samples (x int)')  # as if projected there
        with pytest.raises(ConfigurationError):
            setup_roles(conn, [SAMPLES.layout(ledger_schema[0])], prefix=prefix)
        assert conn.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'").fetchone() \
            == owner_before
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (f"{prefix}projector",)).fetchone() is None

    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "projections.cli", "grant", "samples", "--schema", "public",
                             "--role-prefix", prefix], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 1
    assert "schema 'public' cannot hold a view that has roles" in result.stderr and "--schema NAME" in result.stderr
