"""The saga coordinator: consumes the events topic and drives every declared saga exactly once.

It is a :class:`projections.runner.LogConsumer` (the loop views use), so a batch's effects
and its offsets commit together. Contract of one batch:

1. each record is matched against every saga definition (:func:`~projections.sagas.machine.input_for`):
   a start event, a reply, or nothing; the touched instances' status rows are locked;
2. the inputs are decided in log order (:func:`~projections.sagas.machine.decide`) with the
   coordinator's clock, each instance on the definition version it started with;
3. per instance, the transitions and commands are appended to its stream with the expected
   version, its status row and timer are written (:func:`projections.sagas.store.write`);
4. the loop commits all of it with the offsets; a crash before the commit leaves nothing,
   and the batch is decided again from the same state.

Timers (:meth:`SagaCoordinator.tick`) are claimed with ``FOR UPDATE SKIP LOCKED`` and fired
and replaced or deleted in one transaction. Operator actions (:func:`act`) lock the row, decide
and write the same way, so they never race the coordinator.
"""

from __future__ import annotations

import logging
from functools import partial
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg

from events.adapters import postgres
from events.errors import ConfigurationError, NotFound
from events.settings import Settings
from events.store.client import EventStore
from events.store.ledger import Ledger
from events.store.log import LogRecord
from projections.fold import Refusal
from projections.runner import DEFAULT_BATCH_SIZE, AppendingConsumer, view_lock
from projections.sagas import store
from events.event import Event
from projections.sagas.declaration import Command, Definitions, Saga, definitions_of
from projections.sagas.machine import Decision, Fired, Input, Operator, decide, input_for

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
OWNER = "evp.saga-coordinator"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class TickOutcome:
    fired: int = 0


class SagaCoordinator(AppendingConsumer):
    """Runs the declared sagas from the log; see the module docstring for the contract.

    ``sagas`` are instances of the project's current definitions (each may list earlier
    versions in ``previous``); ``clock`` is the time decisions use (tests inject one);
    ``schema`` holds the status rows, timers and positions.
    """

    def __init__(
        self,
        settings: Settings,
        sagas: Sequence[Saga],
        *,
        schema: str = store.DEFAULT_SCHEMA,
        clock: Clock = utc_now,
        batch_size: int = DEFAULT_BATCH_SIZE,
        actor: str = OWNER,
        scale_out: bool = False,
    ) -> None:
        if not sagas:
            raise ConfigurationError("a saga coordinator needs at least one saga (declare them in [sagas] of evp.toml)")
        self.definitions = definitions_of(sagas)
        # Scaled out, coordinators share the partitions; an instance's row lock and its stream's
        # expected version keep two of them from deciding for one instance at once.
        super().__init__(settings, OWNER, schema, batch_size=batch_size, scale_out=scale_out)
        self.clock = clock
        self.actor = actor
        self._versions_checked = False

    # -- LogConsumer ----------------------------------------------------------------------
    def open(self) -> None:
        """Connect (see :meth:`LogConsumer.open`); refuse while open instances need a version this one lacks.

        The check runs on every new connection until it passes, so a coordinator called
        again after a refusal refuses again.
        """
        fresh = self._conn is None or self._conn.closed or not self._versions_checked
        super().open()
        if fresh:
            assert self._conn is not None
            self._versions_checked = False
            with self._conn.cursor() as cur:
                check_versions(cur, self.schema, self.definitions)
            self._versions_checked = True

    def create_tables(self, cur: psycopg.Cursor[Any]) -> None:
        store.create_tables(cur, self.schema)

    def apply(self, cur: psycopg.Cursor[Any], records: Sequence[LogRecord]) -> list[Refusal]:
        inputs: list[tuple[Saga, str, Input, LogRecord]] = []
        for record in records:
            if store.is_transition(record.event_type):
                continue
            for definitions in self.definitions.values():
                found = input_for(definitions.current, record.event_type, str(record.event_id), record.data)
                if found is not None:
                    key, received = found
                    inputs.append((definitions.current, key, received, record))
        if inputs:
            self._decide_all(cur, [(saga, saga.saga_id(key), received) for saga, key, received, _ in inputs],
                             {str(r.event_id): r for *_, r in inputs})
        return []

    # -- deciding and writing -------------------------------------------------------------
    def _decide_all(self, cur: psycopg.Cursor[Any], inputs: Sequence[tuple[Saga, str, Input]],
                    records: Mapping[str, LogRecord] | None = None) -> int:
        """Decide ``inputs`` in order and write them; returns how many decided something."""
        stored = store.load(cur, self.schema, [saga_id for _, saga_id, _ in inputs])
        context = store.ContextLoader(cur, self.events)
        for event_id, record in (records or {}).items():
            context.remember(event_id, store.Deferred(partial(self.events.decrypt, record)))
        ledger = Ledger(cur.connection, self.settings.partitions)
        now = self.clock()
        decided = 0
        for saga, saga_id, received in inputs:
            before = stored.get(saga_id)
            definition = saga if before is None else self._definition(saga.name, before.state.definition_version)
            decision: Decision = decide(definition, None if before is None else before.state, received, now, context,
                                        saga_id=saga_id, check=self._check)
            if decision.empty:
                continue
            after = store.write(cur, self.schema, ledger, self.events, before, decision, self.actor, now)
            if after is not None:
                stored[saga_id] = after
                decided += 1
        return decided

    def _check(self, command: Command) -> None:
        self.events.check(Event(command.type, command.data))

    def _definition(self, name: str, version: int) -> Saga:
        found = self.definitions[name].version(version)
        if found is None:
            raise ConfigurationError(f"saga {name!r} v{version} is not declared (keep it in `previous`)")
        return found

    # -- timers ---------------------------------------------------------------------------
    def tick(self, limit: int = 500) -> TickOutcome:
        """Fire every timer due at the clock's now (up to ``limit``) in one transaction."""
        self.open()
        assert self._conn is not None
        now = self.clock()
        with self._conn.transaction(), self._conn.cursor() as cur:
            inputs: list[tuple[Saga, str, Input]] = [
                (self.definitions[s.state.saga].current, s.state.saga_id, Fired(s.state.timer))
                for s in store.due(cur, self.schema, now, limit)
                if s.state.timer is not None and s.state.saga in self.definitions
            ]
            fired = self._decide_all(cur, inputs)
        return TickOutcome(fired)

    # -- driving --------------------------------------------------------------------------
    def between_batches(self) -> None:
        """Running (``run``): due timers fire after every poll."""
        self.tick()


def check_versions(cur: psycopg.Cursor[Any], schema: str, definitions: Mapping[str, Definitions]) -> None:
    """Refuse to run when open instances need a definition version this coordinator does not have, naming them."""
    missing: list[str] = []
    for (name, version), ids in store.open_versions(cur, schema).items():
        if name in definitions and definitions[name].version(version) is None:
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            have = sorted(definitions[name].by_version)
            missing.append(f"saga {name!r} v{version} (declared: {have}) is needed by open instance(s) {shown}")
    if missing:
        raise ConfigurationError("refusing to coordinate: " + "; ".join(missing)
                                 + " — keep the old version in the saga's `previous` until they finish")


def act(settings: Settings, sagas: Sequence[Saga], saga_id: str, action: Operator, *,
        schema: str = store.DEFAULT_SCHEMA, clock: Clock = utc_now) -> Decision:
    """One operator action on one instance: lock its row, decide, write, commit.

    Raises NotFound for an unknown instance and :class:`~projections.sagas.machine.SagaRefused`
    when the action does not apply to its state; nothing is written then.
    """
    definitions = definitions_of(sagas)
    with postgres.connect(settings.database_url, autocommit=True) as conn, EventStore.open(settings) as events:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(view_lock(schema))  # serialised with the coordinator's batches
            found = store.load(cur, schema, [saga_id])
            if saga_id not in found:
                raise NotFound(f"no saga instance {saga_id!r} in schema {schema!r}")
            before = found[saga_id]
            name = before.state.saga
            if name not in definitions:
                raise ConfigurationError(f"saga {name!r} is not declared in this project")
            definition = definitions[name].version(before.state.definition_version)
            if definition is None:
                raise ConfigurationError(f"saga {name!r} v{before.state.definition_version} is not declared")
            now = clock()
            decision = decide(definition, before.state, action, now, store.ContextLoader(cur, events),
                              check=lambda command: events.check(Event(command.type, command.data)))
            store.write(cur, schema, Ledger(conn, settings.partitions), events, before, decision, action.actor, now)
        events.flush()
    return decision

