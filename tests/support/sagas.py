"""Driving sagas against the real services: the jobs test project, a clock the test moves, and the loops.

:class:`Jobs` runs the coordinator, the worker participant and the relay in this process,
round by round (publish the outbox, catch the coordinator up, catch the worker up, publish,
fire due timers), so a test decides when time passes and never sleeps.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from psycopg import sql

from events.adapters import postgres
from events.event import Event
from events.ids import uuid7
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import LogRecord, end_offsets, read_range
from projections.sagas import store as saga_store
from projections.sagas.coordinator import SagaCoordinator
from projections.sagas.machine import TERMINAL, SagaState
from projections.sagas.participant import ParticipantRunner

PROJECT = Path(__file__).resolve().parent / "saga_project"


def jobs_module() -> Any:
    """The test project's saga module (imported as a project's declarations are, its folder on sys.path)."""
    import importlib

    from events.project import Project

    Project.read(PROJECT).load("sagas", "job")
    return importlib.import_module("jobs.sagas")


@dataclass
class Clock:
    """The coordinator's time; moves only when the test says."""

    now: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


class Jobs:
    """The coordinator for jobs of 1..6 steps, the worker, and a store to start jobs with."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        module = jobs_module()
        self.settings = settings
        self.clock = clock or Clock()
        self.sagas = [cls() for cls in module.JOBS.values()]
        self.store = EventStore.open(settings)
        self.coordinator = SagaCoordinator(settings, self.sagas, clock=self.clock)
        self.worker = ParticipantRunner(settings, module.Worker())

    def close(self) -> None:
        for closer in (self.coordinator, self.worker, self.store):
            closer.close()

    def start(self, job_id: str, steps: int, plan: Mapping[str, Sequence[str]] | None = None,
              event_id: uuid.UUID | None = None) -> None:
        data = {"job_id": job_id, "steps": steps, "plan": json.dumps(dict(plan or {}))}
        self.store.append(f"job-{job_id}", Event("JobRequested", data, event_id or uuid7()))

    def round(self, *, timers_after: timedelta = timedelta(seconds=5)) -> None:
        """One round: publish, coordinate, work, publish, coordinate; then let time pass and fire timers."""
        self.store.flush()
        self.coordinator.catch_up()
        self.store.flush()
        self.worker.catch_up()
        self.store.flush()
        self.coordinator.catch_up()
        self.clock.advance(timers_after)
        self.coordinator.tick()

    def drive(self, job_ids: Sequence[str], rounds: int = 40) -> dict[str, SagaState]:
        """Rounds until every job's saga is terminal or parked (or ``rounds`` run out); their states."""
        states: dict[str, SagaState] = {}
        idle = False
        for _ in range(rounds):
            # Retries come due within seconds; deadlines only pass when a round changed nothing.
            self.round(timers_after=timedelta(minutes=2) if idle else timedelta(seconds=5))
            before, states = states, self.states()
            if len(states) >= len(job_ids) and all(s.status in (*TERMINAL, "parked") for s in states.values()):
                break
            idle = before == states
        self.store.flush()
        return states

    def states(self) -> dict[str, SagaState]:
        """key -> state, from the coordinator's status rows."""
        with postgres.connect(self.settings.database_url, autocommit=True) as conn, conn.cursor() as cur:
            rows = cur.execute(sql.SQL("SELECT state FROM {}.evp_sagas").format(
                sql.Identifier(saga_store.DEFAULT_SCHEMA))).fetchall()
        return {s.key: s for s in (SagaState.from_json(r[0]) for r in rows)}

    def effects(self) -> list[tuple[str, str, str]]:
        """(job, step, kind) of every effect the worker applied, in the order applied."""
        with postgres.connect(self.settings.database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT job_id, step, kind FROM worker_participant.effects ORDER BY seq").fetchall()
        return [(a, b, c) for a, b, c in rows]

    def topic_timeline(self, saga_id: str) -> list[tuple[int, str]]:
        """(version, type) of the saga stream's records on the topic, relay duplicates dropped."""
        ends = end_offsets(self.settings, self.settings.events_topic)
        seen: dict[int, str] = {}
        for record in read_range(self.settings, self.settings.events_topic, self.store.codec,
                                 {p: (0, end) for p, end in ends.items()}):
            if isinstance(record, LogRecord) and record.stream_id == saga_id:
                seen.setdefault(record.version, record.event_type)
        return sorted(seen.items())

    def ledger_timeline(self, saga_id: str) -> list[tuple[int, str]]:
        return [(r.version, r.event_type) for r in self.store.ledger.read_stream(saga_id)]


@contextmanager
def jobs(settings: Settings, clock: Clock | None = None) -> Iterator[Jobs]:
    harness = Jobs(settings.with_(project=PROJECT), clock)
    try:
        yield harness
    finally:
        harness.close()
