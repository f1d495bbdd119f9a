"""What every benchmark needs: a throwaway place on the running services, and a stopwatch."""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"

from events.adapters.kafka import admin  # noqa: E402
from events.settings import Settings, with_database  # noqa: E402


@contextmanager
def throwaway(base: Settings) -> Iterator[Settings]:
    """A fresh database, topic prefix and home, all removed afterwards."""
    name = f"evp_bench_{uuid.uuid4().hex[:10]}"
    server = base.admin_url("a benchmark (it creates a database)", "postgres")
    owner = conninfo_to_dict(base.database_url).get("user") or "evp"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    with tempfile.TemporaryDirectory() as home:
        settings = base.with_(
            database_url=with_database(base.database_url, name), topic_prefix=f"bench{uuid.uuid4().hex[:8]}", home=Path(home), project=DIGITS,
            kek_file=Path(home) / "kek",
        )
        try:
            yield settings
        finally:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            client = admin(settings)
            try:
                mine = [t for t in client.list_topics() if t.startswith(settings.topic_prefix + ".")]
                if mine:
                    client.delete_topics(mine)
            finally:
                client.close()


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started
