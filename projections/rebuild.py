"""Rebuild a view from the start of the log without readers ever seeing it half-built.

The projection is replayed from offset 0 into a shadow schema (``<schema>_rebuild``) while
the live schema keeps serving, and keeps being updated by any running runner. Then, in one
transaction under the schema's advisory lock, the live schema is dropped and the shadow is
renamed into its place. PostgreSQL's DDL is transactional: a reader sees the old tables
until the commit and the new ones after it, never neither. A running runner notices at its
next batch that the stored positions moved and re-seeks to the new schema's positions.

:func:`rebuild_as_of` is the other kind: the view as it was at a cut of the log
(:mod:`events.store.cut`), replayed into a schema of its own next to the live one, for an
auditor to read. Nothing is swapped and the live schema is never touched.
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
from events.store.cut import Cut
from projections.runner import CatchUpResult, CutCatchUp, Progress, ProjectionRunner, ensure_view_schema, view_lock
from projections.view import Layout, View

SHADOW_SUFFIX = "_rebuild"
MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names silently; refuse instead


@dataclass(frozen=True)
class RebuildResult:
    """What the rebuild replayed, and the row count of every table of the new view."""

    schema: str
    replay: CatchUpResult
    rows: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class PastRebuild:
    """A view replayed up to a cut into ``schema``, beside the ``live`` one: the cut, what was
    replayed (with the records beyond the cut skipped) and the row count of every table."""

    schema: str
    live: str
    replay: CutCatchUp
    rows: dict[str, int]
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {"schema": self.schema, "live": self.live, "cut": self.replay.cut.as_dict(),
                "replay": {k: v for k, v in self.replay.__dict__.items() if k != "cut"}, "rows": self.rows,
                "seconds": self.seconds}


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


def rebuild_as_of(
    settings: Settings,
    view: View,
    cut: Cut,
    *,
    into: str,
    schema: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    prefetch: bool = False,
) -> PastRebuild:
    """Replay ``view`` from offset 0 up to ``cut`` into schema ``into``; the live schema stays as it is.

    1. ``into`` must not be the live schema (``schema``, default the declared one), nor the
       shadow a live rebuild replays into and renames, and must fit PostgreSQL's names:
       ConfigurationError naming it otherwise;
    2. under ``into``'s advisory lock, ``into`` must hold no table (ConfigurationError naming
       it and its tables: a past view is written only into a schema of its own, never over
       anything); the view's tables are created in the same transaction;
    3. the log is consumed up to the cut's ends, skipping the records the cut does not admit
       (:meth:`~projections.runner.LogConsumer.catch_up_to`);
    4. a replay that fails leaves nothing behind: the tables it made are dropped (and ``into``
       too when this call created it), so it can be run again;
    5. nothing is swapped and nothing is recorded: a past view is a read of the log.
    """
    started = time.monotonic()
    live = view.layout(schema).schema
    layout = view.layout(into)
    _refuse_into(live, into)
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        created = _claim(conn, layout, live)
        try:
            with ProjectionRunner(settings, view, schema=into, prefetch=prefetch) as runner:
                replay = runner.catch_up_to(cut, on_progress)
        except BaseException:
            try:
                _discard(conn, into, created)
            except psycopg.Error:  # the database is what failed: the original error says more
                pass
            raise
        rows = table_counts(conn, into)
    return PastRebuild(into, live, replay, rows, time.monotonic() - started)


def _refuse_into(live: str, into: str) -> None:
    """Step 1 of :func:`rebuild_as_of`."""
    if into == live:
        raise ConfigurationError(f"--into {into!r} is the live schema of the view: a past view never replaces the live one; "
                                 "name a schema of its own")
    if into == shadow_name(live):
        raise ConfigurationError(f"--into {into!r} is the shadow schema a rebuild of {live!r} replays into and swaps in; "
                                 "name a schema of its own")
    if len(into.encode()) > MAX_IDENTIFIER:
        raise ConfigurationError(f"--into {into!r} is too long for a PostgreSQL schema name ({MAX_IDENTIFIER} bytes at most)")


def _claim(conn: psycopg.Connection[Any], layout: Layout, live: str) -> bool:
    """Step 2 of :func:`rebuild_as_of`: whether the schema was created here."""
    into = layout.schema
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(view_lock(into))
        existed = cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (into,)).fetchone() is not None
        held = [r[0] for r in cur.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename LIMIT 6", (into,))]
        if held:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            raise ConfigurationError(f"--into {into!r} already holds tables ({shown}): a past view of {layout.view!r} "
                                     f"(live in {live!r}) is replayed only into an empty or new schema")
        ensure_view_schema(conn, layout)
    return not existed


def _discard(conn: psycopg.Connection[Any], schema: str, created: bool) -> None:
    """Step 4 of :func:`rebuild_as_of`: drop what a failed replay made."""
    if created:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        return
    for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)).fetchall():
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(sql.Identifier(schema), sql.Identifier(table)))


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
