"""Rebuild a view from the start of the log without readers ever seeing it half-built.

The projection is replayed from offset 0 into a shadow schema (``<schema>_rebuild``) while
the live schema keeps serving, and keeps being updated by any running runner. Then, in one
transaction under the schema's advisory lock, the live schema is dropped and the shadow is
renamed into its place. PostgreSQL's DDL is transactional: a reader sees the old tables
until the commit and the new ones after it, never neither. A running runner notices at its
next batch that the stored positions moved and re-seeks to the new schema's positions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from events.adapters import postgres
from events.store.client import EventStore
from events.errors import ConfigurationError
from events.event import Event
from events.schema.catalog import Catalog
from events.settings import Settings
from projections.runner import CatchUpResult, Progress, ProjectionRunner, view_lock
from projections.view import View

SHADOW_SUFFIX = "_rebuild"
MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names silently; refuse instead


@dataclass(frozen=True)
class RebuildResult:
    """What the rebuild replayed, and the row count of every table of the new view."""

    schema: str
    replay: CatchUpResult
    rows: dict[str, int]
    seconds: float


def shadow_name(schema: str) -> str:
    """The schema a rebuild of ``schema`` replays into; ConfigurationError when too long."""
    name = schema + SHADOW_SUFFIX
    if len(name.encode()) > MAX_IDENTIFIER:
        raise ConfigurationError(f"schema name {schema!r} is too long for a shadow schema ({MAX_IDENTIFIER} bytes at most)")
    return name


def rebuild(
    settings: Settings,
    view: View,
    *,
    schema: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    before_swap: Callable[[], None] | None = None,
    prefetch: bool = False,
) -> RebuildResult:
    """Replay ``view`` into a shadow schema and swap it in atomically.

    1. drop what a crashed rebuild left in the shadow schema;
    2. catch the shadow up from offset 0, then once more for what arrived meanwhile;
    3. run ``before_swap`` (a hook for grants, tests and callers that verify the shadow);
    4. under the view's advisory lock, drop the live schema and rename the shadow to it;
    5. record a ``ProjectionRebuilt`` event.

    ``prefetch``: fetch and decode in a process of their own (:mod:`events.store.source`).
    """
    started = time.monotonic()
    live = view.layout(schema).schema
    shadow = shadow_name(live)
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(shadow)))  # a crashed rebuild's
    with ProjectionRunner(settings, view, schema=shadow, prefetch=prefetch) as runner:
        replay = runner.catch_up(on_progress)
        # A second, short pass picks up what arrived during the replay.
        tail = runner.catch_up()
    replay = CatchUpResult(
        replay.applied + tail.applied, replay.skipped + tail.skipped,
        replay.dead_lettered + tail.dead_lettered, replay.seconds + tail.seconds,
    )
    if before_swap is not None:
        before_swap()
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(view_lock(live))
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(live)))
            cur.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(shadow), sql.Identifier(live)))
        rows = table_counts(conn, live)
    _record(settings, view, live, replay)
    return RebuildResult(live, replay, rows, time.monotonic() - started)


def _record(settings: Settings, view: View, schema: str, replay: CatchUpResult) -> None:
    """Rebuilds are events too (the platform records itself)."""
    with EventStore.open(settings, Catalog.platform()) as store:
        store.append(f"rebuilds-{view.name}", Event("ProjectionRebuilt", {
            "projection": view.name, "schema": schema, "applied": replay.applied, "skipped": replay.skipped,
            "dead_lettered": replay.dead_lettered,
        }, actor=settings.actor))
        store.flush()


def table_counts(conn: psycopg.Connection[Any], schema: str) -> dict[str, int]:
    """Rows per view table of ``schema`` (the runner's own ``evp_*`` tables left out)."""
    tables = [
        r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename NOT LIKE 'evp\\_%%' ORDER BY tablename",
            (schema,),
        )
    ]
    counts: dict[str, int] = {}
    for table in tables:
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        counts[table] = int(conn.execute(query).fetchone()[0])  # type: ignore[index]
    return counts
