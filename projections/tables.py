"""A declared view's tables in PostgreSQL: created, loaded and written from its :class:`Layout`.

All SQL on a view's own tables lives here; the runner only calls :func:`apply` inside its
transaction. Contract of :func:`apply` for one batch (records in log order):

1. route the records (:func:`projections.fold.route`) and load the touched rows with one
   ``SELECT ... WHERE key = ANY(...)``;
2. fold them in memory (:func:`projections.fold.fold`);
3. look up which subjects of the rows to write are forgotten (remembered in
   ``evp_forgotten_subjects``, so an erasure that arrives before its row still applies) and
   redact those rows in memory (:func:`projections.fold.redact`);
4. write the net changes: one ``DELETE``; the rows of keys that step 1 did not find, with one
   ``COPY`` straight into the table (the batch's lock keeps anyone else from inserting
   them); the rows of keys it found, with one ``COPY`` into a session-private staging table
   and one ``INSERT ... ON CONFLICT`` merge from it;
5. remember the batch's erasures and redact the rows already in the table that name them
   (one ``UPDATE`` per subject column);
6. return the records the view refused (they are dead-lettered by the runner).

A psycopg ``DataError`` or ``IntegrityError`` (a value the column cannot hold) propagates:
the runner then re-applies the batch record by record to find the poison one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import cache
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from events.errors import ConfigurationError
from events.store.log import LogRecord
from projections.fold import Changes, Refusal, Stored, fold, redact, route, subjects_of
from projections.view import ERASED, PROVENANCE, Layout, Row, Sealed, View, provenance

FORGOTTEN_TABLE = "evp_forgotten_subjects"
#: The advisory-lock class of a view row's key lock (scaled-out runners), a stable 31-bit value.
KEY_LOCK_CLASS = zlib.crc32(b"evp-view-key") & 0x7FFFFFFF
_NUMERIC_ARRAYS = ("real[]", "double precision[]", "float4[]", "float8[]", "integer[]", "int[]", "int4[]",
                   "bigint[]", "int8[]", "smallint[]", "int2[]", "numeric[]")


@dataclass(frozen=True)
class _Statements:
    create: tuple[sql.Composed, ...]
    load: sql.Composed
    stage: sql.Composed
    copy: sql.Composed
    insert: sql.Composed
    merge: sql.Composed
    clear: sql.Composed
    delete: sql.Composed
    known: sql.Composed
    forget: sql.Composed
    redact: tuple[tuple[str, sql.Composed], ...]  #: (subject column, UPDATE)
    read: sql.Composed
    ordered: sql.Composed


@cache
def statements(layout: Layout) -> _Statements:
    """Every statement of one layout, composed once."""
    t = sql.Identifier(layout.schema, layout.table)
    stored = layout.stored()
    names = [n for n, _ in stored]
    cols = sql.SQL(", ").join(map(sql.Identifier, names))
    key = sql.Identifier(layout.key.name)
    key_array = sql.SQL(layout.key.sql_type + "[]")
    digest = hashlib.sha1(repr((layout.schema, layout.table, stored)).encode()).hexdigest()[:16]
    stage = sql.Identifier(f"evp_stage_{digest}")
    definitions = [
        sql.SQL("{} {}{}").format(
            sql.Identifier(n), sql.SQL(typ),
            sql.SQL(" PRIMARY KEY") if n == layout.key.name else
            sql.SQL(" NOT NULL DEFAULT false") if n == ERASED else sql.SQL(""),
        )
        for n, typ in stored
    ]
    indexed = list(dict.fromkeys([*layout.indexes, *layout.subjects()]))
    create = [
        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(t, sql.SQL(", ").join(definitions)),
        # Erasures may arrive before the rows they erase (another stream, maybe another
        # partition), so they are remembered and applied to late rows too.
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (subject_id text PRIMARY KEY)").format(
            sql.Identifier(layout.schema, FORGOTTEN_TABLE)),
        *(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                sql.Identifier(f"{layout.table}_by_{c}"[:63]), t, sql.Identifier(c))
            for c in indexed
        ),
    ]
    updates = sql.SQL(", ").join(
        sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(n), sql.Identifier(n)) for n in names if n != layout.key.name
    )
    conflict = sql.SQL("DO UPDATE SET {}").format(updates) if len(names) > 1 else sql.SQL("DO NOTHING")
    redactions = []
    for subject, personal in layout.subjects().items():
        cleared = [sql.Identifier(c) for c in personal] + [sql.Identifier(provenance(c, p)) for c in personal for p in PROVENANCE]
        redactions.append((subject, sql.SQL(
            "UPDATE {t} SET {cleared}, {erased} = true WHERE {subject}::text = ANY(%s::text[]) AND ({any_set})"
        ).format(
            t=t, cleared=sql.SQL(", ").join(sql.SQL("{} = NULL").format(c) for c in cleared),
            erased=sql.Identifier(ERASED), subject=sql.Identifier(subject),
            any_set=sql.SQL(" OR ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in personal),
        )))
    forgotten = sql.Identifier(layout.schema, FORGOTTEN_TABLE)
    return _Statements(
        create=tuple(create),
        load=sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s::{})").format(cols, t, key, key_array),
        stage=sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS").format(stage, t),
        copy=sql.SQL("COPY pg_temp.{} ({}) FROM STDIN").format(stage, cols),
        insert=sql.SQL("COPY {} ({}) FROM STDIN").format(t, cols),
        merge=sql.SQL("INSERT INTO {} AS t ({}) SELECT {} FROM pg_temp.{} ON CONFLICT ({}) {}").format(
            t, cols, cols, stage, key, conflict),
        clear=sql.SQL("TRUNCATE pg_temp.{}").format(stage),
        delete=sql.SQL("DELETE FROM {} WHERE {} = ANY(%s::{})").format(t, key, key_array),
        known=sql.SQL("SELECT subject_id FROM {} WHERE subject_id = ANY(%s::text[])").format(forgotten),
        forget=sql.SQL("INSERT INTO {} (subject_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING").format(forgotten),
        redact=tuple(redactions),
        read=sql.SQL("SELECT {} FROM {}").format(cols, t),
        ordered=sql.SQL("SELECT {} FROM {} ORDER BY {}").format(cols, t, key),
    )


# -- creating ------------------------------------------------------------------------------
def create(cur: psycopg.Cursor[Any], layout: Layout) -> None:
    """Create the view's tables and indexes (idempotent); refuse a table of another shape.

    Raises :class:`ConfigurationError` naming the view when the table exists with other
    columns than the declaration's (the declaration changed: rebuild the view).
    """
    for statement in statements(layout).create:
        cur.execute(statement)
    found = [r[0] for r in cur.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
        " ORDER BY ordinal_position", (layout.schema, layout.table),
    )]
    wanted = [n for n, _ in layout.stored()]
    if found != wanted:
        raise ConfigurationError(
            f"view {layout.view!r}: table {layout.schema}.{layout.table} has columns {found}, the declaration {wanted}; "
            f"rebuild it (evp projections rebuild {layout.view})"
        )


# -- one batch -----------------------------------------------------------------------------
def apply(cur: psycopg.Cursor[Any], view: View, layout: Layout, records: Sequence[LogRecord], *,
          lock_keys: bool = False) -> list[Refusal]:
    """Fold ``records`` into the view's tables (the contract in the module docstring).

    ``lock_keys``: first take a transaction lock per touched key, in one sorted order, so
    runners that share the view's partitions never fold one row from two stale copies.
    """
    st = statements(layout)
    routed = route(view, layout, records)
    if lock_keys and routed.keys:
        hashes = sorted({zlib.crc32(f"{layout.schema}/{key}".encode()) - 2**31 for key in routed.keys})
        cur.execute("SELECT count(pg_advisory_xact_lock(%s, h)) FROM (SELECT unnest(%s::int[]) AS h ORDER BY 1) s",
                    (KEY_LOCK_CLASS, hashes))
    loaded = load(cur, layout, routed.keys)
    changes = fold(layout, routed, loaded)
    subjects = subjects_of(layout, changes.puts)
    forgotten = set(changes.forgotten)
    if subjects - forgotten:
        forgotten |= {r[0] for r in cur.execute(st.known, (sorted(subjects - forgotten),))}
    write(cur, layout, Changes(redact(layout, changes.puts, forgotten), changes.deletes, changes.forgotten), loaded.keys())
    return list(changes.refused)


def load(cur: psycopg.Cursor[Any], layout: Layout, keys: Sequence[Any]) -> dict[Any, Stored]:
    """The stored rows of ``keys`` (absent keys are left out)."""
    if not keys:
        return {}
    rows = cur.execute(statements(layout).load, (list(keys),)).fetchall()
    return {stored.row[layout.key.name]: stored for stored in (_from_table(layout, r) for r in rows)}


def write(cur: psycopg.Cursor[Any], layout: Layout, changes: Changes, stored_keys: Collection[Any]) -> None:
    """Steps 4 and 5: deletes, puts and erasures; each key is in one list, so the order is free.

    ``stored_keys`` are the keys in the table now, read under the batch's lock: puts of other
    keys are new rows and are copied straight into the table; the rest are merged.
    """
    st = statements(layout)
    if changes.deletes:
        cur.execute(st.delete, (list(changes.deletes),))
    key = layout.key.name
    fresh = [s for s in changes.puts if s.row[key] not in stored_keys]
    if fresh:
        _copy_rows(cur, layout, st.insert, fresh)
    if len(fresh) < len(changes.puts):
        cur.execute(st.stage)
        _copy_rows(cur, layout, st.copy, [s for s in changes.puts if s.row[key] in stored_keys])
        cur.execute(st.merge)
        cur.execute(st.clear)
    if changes.forgotten:
        subjects = sorted(changes.forgotten)
        cur.execute(st.forget, (subjects,))
        for _, update in st.redact:
            cur.execute(update, (subjects,))


def _copy_rows(cur: psycopg.Cursor[Any], layout: Layout, statement: sql.Composed, rows: Sequence[Stored]) -> None:
    types = [t for _, t in layout.stored()]
    with cur.copy(statement) as copy:
        for stored in rows:
            copy.write_row([_copy_value(t, v) for t, v in zip(types, _to_table(layout, stored))])


# -- reading -------------------------------------------------------------------------------
def read_rows(cur: psycopg.Cursor[Any], view: View, schema: str | None = None) -> dict[Any, Row]:
    """The whole view as ``{key: row}``: declared columns (personal ones as :class:`Sealed`),
    plus ``erased`` when the view has personal columns. For audits, comparisons and tests."""
    layout = view.layout(schema)
    out: dict[Any, Row] = {}
    for r in cur.execute(statements(layout).read):
        stored = _from_table(layout, r)
        row = dict(stored.row)
        if layout.personal:
            row[ERASED] = stored.erased
        out[row[layout.key.name]] = row
    return out


@dataclass(frozen=True)
class Digest:
    """A view's rows, hashed: equal digests mean equal rows (sealed values compared as sealed)."""

    schema: str
    rows: int
    sha256: str


def digest(conn: psycopg.Connection[Any], view: View, schema: str | None = None) -> Digest:
    """SHA-256 over the view's rows in key order, each as canonical JSON (:func:`canonical_row`).

    Streams the table through a server-side cursor, so a view larger than memory digests.
    Two copies of a view (a rebuild, a restore, another runner) have the same digest exactly
    when they hold the same rows; the bookkeeping tables (offsets, versions) are left out.
    """
    layout = view.layout(schema)
    hasher = hashlib.sha256()
    count = 0
    with conn.transaction(), conn.cursor(name="evp_view_digest") as cur:
        cur.itersize = 2000
        cur.execute(statements(layout).ordered)
        for values in cur:
            stored = _from_table(layout, values)
            row = {**stored.row, ERASED: stored.erased} if layout.personal else stored.row
            hasher.update(canonical_row(row).encode())
            hasher.update(b"\n")
            count += 1
    return Digest(layout.schema, count, hasher.hexdigest())


def canonical_row(row: Row) -> str:
    """One row as JSON with sorted keys: sealed values as their ciphertext and binding, times in
    ISO 8601, bytes in hex, decimals as text."""

    def plain(value: Any) -> Any:
        if isinstance(value, Sealed):
            return {"sealed": value.value, "event_id": str(value.event_id), "event_type": value.event_type,
                    "field": value.field}
        if isinstance(value, (datetime, date)):
            return value.isoformat()
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value).hex()
        if isinstance(value, (Decimal, uuid.UUID)):
            return str(value)
        raise TypeError(f"a view value of type {type(value).__name__} has no canonical form")

    return json.dumps(row, sort_keys=True, separators=(",", ":"), default=plain, ensure_ascii=False)


# -- row <-> table -------------------------------------------------------------------------
def _to_table(layout: Layout, stored: Stored) -> list[Any]:
    values: list[Any] = []
    for column in layout.columns:
        value = stored.row.get(column.name)
        if column.personal:
            values += [None] * 4 if value is None else [value.value, value.event_id, value.event_type, value.field]
        else:
            values.append(value)
    if layout.personal:
        values.append(stored.erased)
    return values


def _from_table(layout: Layout, values: Iterable[Any]) -> Stored:
    it = iter(values)
    row: Row = {}
    for column in layout.columns:
        if column.personal:
            value, event_id, event_type, field = next(it), next(it), next(it), next(it)
            row[column.name] = None if value is None else Sealed(value, event_id, event_type, field)
        else:
            row[column.name] = next(it)
    erased = bool(next(it)) if layout.personal else False
    return Stored(row, erased)


def _numeric_literal(values: list[Any] | tuple[Any, ...]) -> str | None:
    """``{1.5,2.0}`` for a list of floats (or of ints), None for anything else (bools, strings, mixed).

    ``float.__repr__`` and ``int.__repr__`` refuse other types in C, so a homogeneous list is
    formatted without a per-element check in Python; only a mixed one falls back to it.
    """
    for render in (float.__repr__, int.__repr__):
        try:
            literal = ",".join(map(render, values))
        except TypeError:
            continue
        if render is int.__repr__ and any(type(v) is bool for v in values):
            return None
        return "{" + literal + "}"
    if all(type(v) in (int, float) for v in values):
        return "{" + ",".join(map(repr, values)) + "}"
    return None


def _copy_value(sql_type: str, value: Any) -> Any:
    """A value ready for COPY; numeric arrays as literals (much faster than adapting each element)."""
    if value is None:
        return None
    if sql_type in _NUMERIC_ARRAYS and isinstance(value, (list, tuple)):
        literal = _numeric_literal(value)
        if literal is not None:
            return literal
    if sql_type in ("json", "jsonb") and isinstance(value, (dict, list)):
        return Jsonb(value)
    return value

