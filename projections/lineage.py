"""The ``views`` lineage source: a subject's rows in every declared view, and their dead letters.

See :mod:`events.ops.lineage` for the protocol. A view row belongs to the subject's lineage
when one of the subject's events wrote it (the view's own routing gives the row key, so a
view that declares no subject column is covered too) or when one of its subject columns
names the subject. Each such row is, for each view and table:

- :data:`~events.ops.lineage.HOLDS`: a personal column of theirs is set and their key lives;
- :data:`~events.ops.lineage.UNREADABLE`: it is set, but their key is destroyed: the view has
  not applied the erasure yet (``evp projections catch-up NAME`` clears it);
- :data:`~events.ops.lineage.REDACTED`: the view applied the erasure: their personal columns
  are cleared;
- :data:`~events.ops.lineage.KEPT`: no personal column of theirs is set: the row holds only
  what is not personal by schema.

Rows whose plain text columns hold a blind index of the subject's personal data (an HMAC a
keyring holder can test a guessed value against) are counted apart: redaction clears
personal columns only, so those stay. Dead letters are records a view refused, copied byte
for byte to ``<prefix>.events.dlq``: sealed like the log, so unreadable once the key is
destroyed; letters that do not decode cannot be attributed and are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timezone
from typing import Any

import psycopg
from psycopg import sql

from events.errors import DecodeError, InvalidEvent
from events.ops.lineage import (
    HOLDS, KEPT, REDACTED, UNREADABLE, Concerning, Holding, SubjectTrace, group_by, listed, trace_subject,
)
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import LogRecord
from projections.deadletter import read_dead_letters
from projections.declarations import load_view
from projections.fold import key_of
from projections.tables import FORGOTTEN_TABLE
from projections.view import Layout, View


def view_holdings(settings: Settings, project: Project | None, subject_id: str) -> list[Holding]:
    """The ``views`` source: per declared view and state, the rows of the subject; then dead letters.

    1. trace the subject (ids, events, keys) and load every view the project declares;
    2. per view whose table exists: the keys the subject's events route to, and the rows
       naming them in a subject column, classified as the module docstring says;
    3. the dead-letter topic's letters whose record concerns the subject.
    """
    views = [load_view(project, name) for name in project.names("views")] if project is not None else []
    with EventStore.open(settings) as store:
        trace = trace_subject(store, subject_id)
        out: list[Holding] = []
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            for view in views:
                out += _view_rows(conn, view, trace)
        out += _dead_letters(settings, store, trace)
    return out


def _view_rows(conn: psycopg.Connection[Any], view: View, trace: SubjectTrace) -> list[Holding]:
    layout = view.layout()
    where = f"view {layout.view} ({layout.schema}.{layout.table})"
    found = conn.execute("SELECT to_regclass(%s)", (f'"{layout.schema}"."{layout.table}"',)).fetchone()
    if found is None or found[0] is None:
        return []  # never run: it holds nothing
    keys = _routed_keys(view, layout, trace.events)
    blind = sorted(trace.blind_indexes)
    rows = conn.execute(_rows_query(layout, bool(blind)),
                        {"keys": keys, "ids": list(trace.ids), "blind": blind}).fetchall()
    forgotten = {r[0] for r in conn.execute(
        sql.SQL("SELECT subject_id FROM {} WHERE subject_id = ANY(%s::text[])").format(
            sql.Identifier(layout.schema, FORGOTTEN_TABLE)), (list(trace.ids),))}
    subjects = list(layout.subjects())
    states: list[str] = []
    indexed = 0
    for row in rows:
        named = [row[1 + 2 * i] for i in range(len(subjects)) if row[1 + 2 * i] in trace.ids]
        sealed = [row[1 + 2 * i] for i in range(len(subjects))
                  if row[1 + 2 * i] in trace.ids and row[2 + 2 * i]]
        indexed += bool(row[-1])
        if sealed:
            states.append(HOLDS if any(trace.sealed_state(s) == HOLDS for s in sealed) else UNREADABLE)
        elif any(s in forgotten for s in named):
            states.append(REDACTED)
        else:
            states.append(KEPT)
    personal = listed(c.name for c in layout.personal)
    details = {
        HOLDS: f"their personal columns ({personal}) sealed under their key; the view clears them when it "
               "applies the erasure",
        UNREADABLE: f"their personal columns ({personal}) sealed under their destroyed key: the view has not "
                    f"applied the erasure yet (evp projections catch-up {layout.view} clears them)",
        REDACTED: f"their personal columns ({personal}) cleared, erased = true",
        KEPT: "rows of their events or naming them, with no personal column of theirs set: not personal by schema",
    }
    out = [Holding(where, "view rows", len(group), state, details[state])
           for state, group in group_by(states, lambda s: s).items()]
    if indexed:
        out.append(Holding(where, "blind indexes", indexed, KEPT,
                           "a plain column holds a blind index of their personal data (an HMAC under the keyring's "
                           "index key: a keyring holder can test a guessed value against it); redaction keeps it"))
    return out


def _routed_keys(view: View, layout: Layout, events: Sequence[Concerning]) -> list[Any]:
    """The row keys the view's handlers would give the subject's events (the runner's routing)."""
    keys: dict[Any, None] = {}
    for event in events:
        found = view.handler_for(event.record.event_type)
        if found is None:
            continue
        try:
            keys[key_of(layout, _record(event), found[0])] = None
        except InvalidEvent:
            continue  # a record the view refuses has no row (it was dead-lettered)
    return list(keys)


def _record(event: Concerning) -> LogRecord:
    r = event.record
    occurred = r.occurred_at if r.occurred_at.tzinfo is not None else r.occurred_at.replace(tzinfo=timezone.utc)
    return LogRecord(r.partition, -1 if r.offset is None else r.offset, r.stream_id, r.version, r.event_id,
                     r.event_type, r.schema_id, r.actor, occurred.isoformat(), event.data, event.policy)


def _rows_query(layout: Layout, blind: bool) -> sql.Composed:
    """``key, (subject, any personal set) per subject column, holds a blind index`` of the rows in question."""
    table = sql.Identifier(layout.schema, layout.table)
    key = sql.Identifier(layout.key.name)
    selected: list[sql.Composable] = [key]
    matches: list[sql.Composable] = [sql.SQL("{} = ANY(%(keys)s::{}[])").format(key, sql.SQL(layout.key.sql_type))]
    for subject, columns in layout.subjects().items():
        selected.append(sql.Identifier(subject))
        selected.append(sql.SQL("({})").format(sql.SQL(" OR ").join(
            sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in columns)))
        matches.append(sql.SQL("{} = ANY(%(ids)s::text[])").format(sql.Identifier(subject)))
    plain = [c for c in layout.columns if c.sql_type == "text" and not c.personal and c is not layout.key]
    if blind and plain:
        selected.append(sql.SQL("({})").format(sql.SQL(" OR ").join(
            sql.SQL("{} = ANY(%(blind)s::text[])").format(sql.Identifier(c.name)) for c in plain)))
    else:
        selected.append(sql.SQL("false"))
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(selected), table, sql.SQL(" OR ").join(matches))


def _dead_letters(settings: Settings, store: EventStore, trace: SubjectTrace) -> list[Holding]:
    states: list[str] = []
    fields: list[str] = []
    for letter in read_dead_letters(settings, settings.dead_letter_topic):
        if not letter.value:
            continue
        try:
            decoded = store.codec.decode(letter.value)
        except DecodeError:
            continue  # not an evp record: whose it is cannot be told
        data, policy = decoded.datum, decoded.policy
        if not set(policy.subjects(data)) & set(trace.ids):
            continue
        mine = [f for f in policy.personal if data.get(f.name) is not None and data.get(f.subject_field) in trace.ids]
        fields += [f"{decoded.event_type.rsplit('.', 1)[-1]}.{f.name}" for f in mine]
        states.append(KEPT if not mine else
                      HOLDS if any(trace.sealed_state(str(data[f.subject_field])) == HOLDS for f in mine) else UNREADABLE)
    details = {
        HOLDS: f"records a view refused, byte for byte: {listed(fields)} sealed under their key",
        UNREADABLE: f"records a view refused, byte for byte: {listed(fields)} sealed under their destroyed key",
        KEPT: "records a view refused that name them, with no personal field of theirs",
    }
    return [Holding(f"topic {settings.dead_letter_topic}", "dead letters", len(group), state, details[state])
            for state, group in group_by(states, lambda s: s).items()]
