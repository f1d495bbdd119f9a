"""Where sagas live in PostgreSQL: their streams in the ledger, status rows and timers in the coordinator's schema.

All SQL on the saga tables is here. The tables, in the coordinator's schema:

- ``evp_sagas``: one row per instance — the correlation (saga, key) → saga id, the status
  the operator commands and ``evp sagas list`` read, the state (the fold of the
  transitions, no personal data: step names, attempts, event ids) and the version of the
  saga's stream, the expected version of its next append;
- ``evp_saga_timers``: at most one timer per instance (a deadline or a scheduled retry),
  claimed with ``FOR UPDATE SKIP LOCKED`` so several coordinators share them.

Contract of :func:`write` (called inside the caller's transaction, the instance's row locked):

1. append the decision's transitions (platform events, ids derived from the saga id and the
   transition's number) and, right after each request, its command (id = the command's
   idempotency key) to the saga's stream, expecting the version the row holds;
2. upsert the status row with the new state and stream version;
3. replace or delete the instance's timer.

A wrong expected version raises :class:`SagaConflict` (retryable): the caller's transaction
rolls back and the caller re-reads the state and decides again.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from events.errors import ConcurrencyError, NotFound, Retryable
from events.event import NO_STREAM, Event
from events.store.client import EventStore
from events.store.ledger import EVENT_COLUMNS, Ledger, row_to_event
from projections.sagas.declaration import SagaContext, derived_id
from projections.sagas.machine import (
    COMPENSATION_REQUESTED, STEP_REQUESTED, TRANSITIONS, Decision, SagaState, Transition, fold,
)

DEFAULT_SCHEMA = "evp_sagas"
PLATFORM_NAMESPACE = "evp.platform"


class SagaConflict(Retryable):
    """A saga's stream moved under this writer (another coordinator or an operator): re-read, decide again."""


def transition_type(kind: str) -> str:
    return f"{PLATFORM_NAMESPACE}.{kind}"


def is_transition(event_type: str) -> bool:
    return event_type.startswith(PLATFORM_NAMESPACE + ".") and event_type.rsplit(".", 1)[-1] in TRANSITIONS


def create_tables(cur: psycopg.Cursor[Any], schema: str) -> None:
    s = sql.Identifier(schema)
    cur.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {}.evp_sagas (saga_id text PRIMARY KEY, saga text NOT NULL, key text NOT NULL,"
        " definition_version integer NOT NULL, status text NOT NULL, step text NOT NULL, attempt integer NOT NULL,"
        " reason text, subject text, stream_version bigint NOT NULL, state jsonb NOT NULL,"
        " started_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, UNIQUE (saga, key))"
    ).format(s))
    cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS evp_sagas_status ON {}.evp_sagas (status, updated_at)").format(s))
    cur.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {}.evp_saga_timers (saga_id text PRIMARY KEY REFERENCES {}.evp_sagas,"
        " kind text NOT NULL, step text NOT NULL, phase text NOT NULL, attempt integer NOT NULL,"
        " due_at timestamptz NOT NULL)"
    ).format(s, s))
    cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS evp_saga_timers_due ON {}.evp_saga_timers (due_at)").format(s))


@dataclass(frozen=True)
class Stored:
    """An instance's state and the version of its stream."""

    state: SagaState
    stream_version: int


def load(cur: psycopg.Cursor[Any], schema: str, saga_ids: Iterable[str], *, lock: bool = True) -> dict[str, Stored]:
    """The instances among ``saga_ids`` that exist, their rows locked (``FOR UPDATE``) unless ``lock`` is false."""
    ids = sorted(set(saga_ids))  # a fixed order: two lockers never wait on each other in a cycle
    if not ids:
        return {}
    query = sql.SQL("SELECT state, stream_version FROM {}.evp_sagas WHERE saga_id = ANY(%s) ORDER BY saga_id{}").format(
        sql.Identifier(schema), sql.SQL(" FOR UPDATE") if lock else sql.SQL(""))
    found = {}
    for state, version in cur.execute(query, (ids,)):
        loaded = SagaState.from_json(state)
        found[loaded.saga_id] = Stored(loaded, int(version))
    return found


def due(cur: psycopg.Cursor[Any], schema: str, now: datetime, limit: int = 500) -> list[Stored]:
    """Claim up to ``limit`` timers due at ``now``: the instances' rows and timers locked, skipping locked ones."""
    s = sql.Identifier(schema)
    rows = cur.execute(sql.SQL(
        "SELECT t.saga_id FROM {}.evp_saga_timers t JOIN {}.evp_sagas g USING (saga_id) WHERE t.due_at <= %s"
        " ORDER BY t.due_at, t.saga_id LIMIT %s FOR UPDATE OF g, t SKIP LOCKED"
    ).format(s, s), (now, limit)).fetchall()
    return list(load(cur, schema, [r[0] for r in rows]).values())


def next_due(cur: psycopg.Cursor[Any], schema: str) -> datetime | None:
    """When the earliest timer comes due, or None without timers."""
    row = cur.execute(sql.SQL("SELECT min(due_at) FROM {}.evp_saga_timers").format(sql.Identifier(schema))).fetchone()
    return None if row is None or row[0] is None else row[0]


def events_of(decision: Decision, before: SagaState | None, actor: str, now: datetime) -> list[Event]:
    """The decision's transitions, each request followed by its command, with their derived ids."""
    commands = {c.event_id: c for c in decision.commands}
    number = 0 if before is None else before.version
    assert decision.state is not None
    saga_id = decision.state.saga_id
    out: list[Event] = []
    for transition in decision.transitions:
        number += 1
        out.append(Event(transition_type(transition.type), transition.data, derived_id(saga_id, "transition", number),
                         actor=transition.actor or actor, occurred_at=now))
        if transition.type in (STEP_REQUESTED, COMPENSATION_REQUESTED):
            issued = commands[str(transition.data["command_id"])]
            out.append(Event(issued.command.type, issued.command.data, uuid.UUID(issued.event_id), actor=actor,
                             occurred_at=now))
    return out


def write(cur: psycopg.Cursor[Any], schema: str, ledger: Ledger, store: EventStore, before: Stored | None,
          decision: Decision, actor: str, now: datetime) -> Stored | None:
    """Write one decision (the contract in the module docstring); returns the instance as stored after it."""
    if decision.empty or decision.state is None:
        return before
    state = decision.state
    events = [store.prepare(e) for e in events_of(decision, None if before is None else before.state, actor, now)]
    try:
        result = ledger.append(state.saga_id, events, NO_STREAM if before is None else before.stream_version)
    except ConcurrencyError as err:
        raise SagaConflict(f"saga {state.saga_id}: {err}; re-reading it") from err
    s = sql.Identifier(schema)
    cur.execute(sql.SQL(
        "INSERT INTO {}.evp_sagas AS g (saga_id, saga, key, definition_version, status, step, attempt, reason, subject,"
        " stream_version, state, started_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (saga_id) DO UPDATE SET status = EXCLUDED.status, step = EXCLUDED.step,"
        " attempt = EXCLUDED.attempt, reason = EXCLUDED.reason, stream_version = EXCLUDED.stream_version,"
        " state = EXCLUDED.state, updated_at = EXCLUDED.updated_at"
    ).format(s), (state.saga_id, state.saga, state.key, state.definition_version, state.status, state.step,
                  state.attempt, state.reason, state.subject, result.last_version, Jsonb(state.to_json()),
                  state.started_at, state.updated_at))
    if state.timer is None:
        if before is not None and before.state.timer is not None:
            cur.execute(sql.SQL("DELETE FROM {}.evp_saga_timers WHERE saga_id = %s").format(s), (state.saga_id,))
    else:
        t = state.timer
        cur.execute(sql.SQL(
            "INSERT INTO {}.evp_saga_timers AS t (saga_id, kind, step, phase, attempt, due_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (saga_id) DO UPDATE SET kind = EXCLUDED.kind,"
            " step = EXCLUDED.step, phase = EXCLUDED.phase, attempt = EXCLUDED.attempt, due_at = EXCLUDED.due_at"
        ).format(s), (state.saga_id, t.kind, t.step, t.phase, t.attempt, t.due_at))
    return Stored(state, result.last_version)


class Deferred(Mapping[str, Any]):
    """An event's data, read (and decrypted) on first use: most builders never look at most of it."""

    def __init__(self, load: Callable[[], Mapping[str, Any]]) -> None:
        self._load = load
        self._data: Mapping[str, Any] | None = None

    def _opened(self) -> Mapping[str, Any]:
        if self._data is None:
            self._data = self._load()
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._opened()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._opened())

    def __len__(self) -> int:
        return len(self._opened())


class ContextLoader:
    """Builds a step's :class:`SagaContext`: the start event and the replies, from the ledger, decrypted.

    Each event is read by id on the caller's cursor the first time a builder looks into it,
    and kept for the loader's life (one batch).
    """

    def __init__(self, cur: psycopg.Cursor[Any], store: EventStore) -> None:
        self._cur, self._store = cur, store
        self._data: dict[str, Mapping[str, Any]] = {}

    def remember(self, event_id: str, data: Mapping[str, Any]) -> None:
        self._data[event_id] = data

    def _event(self, event_id: str) -> Mapping[str, Any]:
        found = self._data.get(event_id)
        if found is None:
            found = self._data[event_id] = Deferred(lambda: self._read(event_id))
        return found

    def _read(self, event_id: str) -> Mapping[str, Any]:
        row = self._cur.execute(f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE event_id = %s",
                                (uuid.UUID(event_id),)).fetchone()
        return {} if row is None else self._store.decode(row_to_event(row)).data

    def __call__(self, state: SagaState, step: str, attempt: int, command_id: str | None) -> SagaContext:
        replies = {name: self._event(i) for name, i in state.replies.items()}
        return SagaContext(state.saga_id, state.key, self._event(state.trigger_event_id), replies, step, attempt,
                           command_id)


# -- reading for operators -------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    saga_id: str
    saga: str
    key: str
    definition_version: int
    status: str
    step: str
    attempt: int
    reason: str | None
    subject: str | None
    started_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "started_at": self.started_at.isoformat(), "updated_at": self.updated_at.isoformat()}


def summaries(cur: psycopg.Cursor[Any], schema: str, *, status: str | None = None,
              older_than: timedelta | None = None, now: datetime | None = None, saga_ids: Sequence[str] = ()
              ) -> list[Summary]:
    """Instances, oldest change first, filtered by status and by time since their last transition."""
    where = [sql.SQL("TRUE")]
    params: list[Any] = []
    if status is not None:
        where.append(sql.SQL("status = %s"))
        params.append(status)
    if older_than is not None:
        where.append(sql.SQL("updated_at <= %s"))
        params.append((now or datetime.now().astimezone()) - older_than)
    if saga_ids:
        where.append(sql.SQL("saga_id = ANY(%s)"))
        params.append(list(saga_ids))
    rows = cur.execute(sql.SQL(
        "SELECT saga_id, saga, key, definition_version, status, step, attempt, reason, subject, started_at, updated_at"
        " FROM {}.evp_sagas WHERE {} ORDER BY updated_at, saga_id"
    ).format(sql.Identifier(schema), sql.SQL(" AND ").join(where)), params).fetchall()
    return [Summary(*row) for row in rows]


def open_versions(cur: psycopg.Cursor[Any], schema: str) -> dict[tuple[str, int], list[str]]:
    """(saga, definition version) -> ids of the open instances on it (not completed, not compensated)."""
    rows = cur.execute(sql.SQL(
        "SELECT saga, definition_version, saga_id FROM {}.evp_sagas WHERE status NOT IN ('completed', 'compensated')"
        " ORDER BY saga_id"
    ).format(sql.Identifier(schema))).fetchall()
    found: dict[tuple[str, int], list[str]] = {}
    for saga, version, saga_id in rows:
        found.setdefault((saga, int(version)), []).append(saga_id)
    return found


def fold_stream(store: EventStore, saga_id: str) -> SagaState | None:
    """The instance's state folded from its stream in the ledger (the row's state must equal it)."""
    transitions = [
        (Transition(e.type.rsplit(".", 1)[-1], dict(e.data), e.record.actor), e.record.occurred_at.isoformat())
        for e in store.read_stream(saga_id, decrypt=False) if is_transition(e.type)
    ]
    return fold(transitions)


TIMELINE_COLUMNS = ("version", "at", "event", "step", "attempt", "actor", "detail")


def timeline(events: EventStore, saga_id: str) -> list[dict[str, Any]]:
    """An instance's timeline from the ledger: one row per transition (step, attempt, reason, actor) or command.

    Commands show by type only: their data may hold personal fields, and stays sealed here.
    """
    try:
        stream = events.read_stream(saga_id, decrypt=False)
    except NotFound:
        raise NotFound(f"no saga {saga_id!r} in the ledger (see `evp sagas list`)") from None
    rows = []
    for event in stream:
        record, data = event.record, event.data
        if is_transition(record.event_type):
            detail = (data.get("reason") or data.get("action") or data.get("command_type") or data.get("reply_type")
                      or ", ".join(data.get("steps") or []))
            row = {"event": record.event_type.rsplit(".", 1)[-1], "step": data.get("step") or "",
                   "attempt": data.get("attempt") or "", "detail": str(detail or "")}
        else:
            row = {"event": f"  -> {record.event_type}", "step": "", "attempt": "", "detail": "command"}
        rows.append({"version": record.version, "at": record.occurred_at.isoformat(timespec="seconds"),
                     "actor": record.actor, "event_id": str(record.event_id), **row})
    return rows
