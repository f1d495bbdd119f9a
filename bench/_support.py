"""What every benchmark needs: a throwaway place on the running services, and a stopwatch."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

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


T = TypeVar("T")


def sizes_from(argv: Sequence[str] | None, doc: str | None, sizes: Mapping[str, T]) -> T:
    """What a bench runs: ``sizes["small"]`` with ``--small``, ``sizes["large"]`` with
    ``--large``, else ``sizes["default"]``; ``doc``'s first paragraph is the ``--help`` text."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--small", dest="size", action="store_const", const="small", help="the smallest size only")
    group.add_argument("--large", dest="size", action="store_const", const="large", help="the largest sizes too")
    return sizes[parser.parse_args(argv).size or "default"]
