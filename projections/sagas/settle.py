"""Running a project's sagas in one process until they settle: for scripts, demos and benches.

A service runs ``evp sagas run``, ``evp sagas participant NAME`` and ``evp relay run`` as
separate processes. A script that starts sagas and wants their outcome calls :func:`settle`:

1. open the coordinator and a runner per participant, all on the same settings;
2. in rounds: publish the outbox, catch the coordinator up and fire its due timers, catch
   each participant up, publish again;
3. stop when no instance is running or compensating (completed, compensated and parked
   are settled), or after ``max_rounds``; when a round changed nothing, wait for the
   earliest timer (at most ``max_wait_s``) instead of spinning;
4. return the instances' summaries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from events.adapters import postgres
from events.settings import Settings
from events.store.client import EventStore
from projections.sagas import store
from projections.sagas.coordinator import Clock, SagaCoordinator, utc_now
from projections.sagas.declaration import Saga
from projections.sagas.machine import COMPENSATING, RUNNING
from projections.sagas.participant import Participant, ParticipantRunner


def settle(
    settings: Settings,
    sagas: Sequence[Saga],
    participants: Sequence[Participant],
    events: EventStore,
    *,
    schema: str = store.DEFAULT_SCHEMA,
    clock: Clock = utc_now,
    max_rounds: int = 200,
    max_wait_s: float = 5.0,
    on_round: Callable[[int, list[store.Summary]], None] | None = None,
) -> list[store.Summary]:
    """Drive every saga started so far until it settles (the contract in the module docstring)."""
    coordinator = SagaCoordinator(settings, sagas, schema=schema, clock=clock)
    runners = [ParticipantRunner(settings, p) for p in participants]
    status = postgres.connect(settings.database_url, autocommit=True)  # one connection for every round's look
    try:
        before: list[store.Summary] = []
        for number in range(1, max_rounds + 1):
            events.flush()
            coordinator.catch_up()
            coordinator.tick()
            events.flush()
            for runner in runners:
                runner.catch_up()
                events.flush()
            coordinator.catch_up()
            events.flush()
            with status.cursor() as cur:
                now = store.summaries(cur, schema)
            if on_round is not None:
                on_round(number, now)
            if not any(s.status in (RUNNING, COMPENSATING) for s in now):
                return now
            if now == before:
                time.sleep(_wait(status, schema, clock, max_wait_s))
            before = now
        return before
    finally:
        for consumer in (coordinator, *runners):
            consumer.close()
        status.close()


def _wait(conn: psycopg.Connection[Any], schema: str, clock: Clock, ceiling: float) -> float:
    with conn.cursor() as cur:
        due = store.next_due(cur, schema)
    if due is None:
        return min(0.2, ceiling)
    return max(0.0, min(ceiling, (due - clock()).total_seconds()))
