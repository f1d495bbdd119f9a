"""The PostgreSQL adapter: migrations under one lock, safe from any number of processes at once."""

from __future__ import annotations

import subprocess
import sys
import time

from events.adapters import postgres
from events.settings import Settings

# Each process waits for the same instant, then opens a store: ledger, keyring and topics
# are all created concurrently on a database that has none of them.
_OPEN_AT = """
import sys, time
from events.settings import Settings
from events.store.client import EventStore
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
with EventStore.open(Settings.from_env()) as store:
    print(store.ledger.version("nothing") is None)
"""


def test_four_processes_opening_a_store_on_a_fresh_database_all_succeed(settings: Settings) -> None:
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT, str(start)], env=settings.to_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert out.strip() == "True"
    with postgres.connect(settings.database_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT schemaname || '.' || tablename FROM pg_tables")}
    ledger = {f"public.{t}" for t in ("evp_events", "evp_outbox", "evp_streams", "evp_reservations")}
    assert ledger | {"evp_keyring.evp_data_keys", "evp_keyring.evp_kek_state"} <= tables
    assert not {"public.evp_data_keys", "public.evp_kek_state"} & tables  # the keyring has a schema of its own


def test_migrating_twice_changes_nothing(settings: Settings) -> None:
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        postgres.migrate(conn)
        before = conn.execute("SELECT count(*) FROM pg_class").fetchone()
        postgres.migrate(conn)
        assert conn.execute("SELECT count(*) FROM pg_class").fetchone() == before


def test_a_store_opened_on_an_up_to_date_schema_takes_no_lock_on_the_ledger(settings: Settings) -> None:
    """A long read holds ACCESS SHARE on the ledger's tables: opening a store again must not
    queue behind it (an ``ALTER TABLE`` would, and every append would queue behind the ALTER)."""
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        postgres.migrate(conn)
        postgres.apply_once(conn, "test.keyring", "CREATE TABLE IF NOT EXISTS t_keys (k text)")
    with postgres.connect(settings.database_url) as reader, \
            postgres.connect(settings.database_url, autocommit=True) as opener:
        for table in ("evp_events", "evp_outbox", "evp_published", "evp_reservations"):
            reader.execute(f"SELECT count(*) FROM {table}")  # held until the reader's transaction ends
        reader.execute("SELECT count(*) FROM t_keys")
        opener.execute("SET lock_timeout = '2s'")
        postgres.migrate(opener)  # raised LockNotAvailable when every open ran the DDL
        assert postgres.apply_once(opener, "test.keyring", "CREATE TABLE IF NOT EXISTS t_keys (k text)") is False
        reader.rollback()


def test_a_script_whose_text_changed_runs_again_and_its_new_digest_is_recorded(settings: Settings) -> None:
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        assert postgres.apply_once(conn, "test.things", "CREATE TABLE IF NOT EXISTS things (a int)") is True
        assert postgres.apply_once(conn, "test.things", "CREATE TABLE IF NOT EXISTS things (a int)") is False
        changed = "CREATE TABLE IF NOT EXISTS things (a int); ALTER TABLE things ADD COLUMN IF NOT EXISTS b int"
        assert postgres.apply_once(conn, "test.things", changed) is True
        columns = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'things' ORDER BY ordinal_position")]
        assert columns == ["a", "b"]
        assert postgres.apply_once(conn, "test.things", changed) is False
        names = {r[0] for r in conn.execute("SELECT name FROM public.evp_migrations")}
        assert names == {"test.things"}
