"""The saga processes the kill tests SIGKILL, and the oracle the saga tests share.

Run as a module, this file is a child process that coordinates (or works) the jobs test
project (:mod:`tests.support.sagas`) in a loop until it is killed::

    python -m tests.support.saga_child coordinator --clock FILE [--batch-size N]
    python -m tests.support.saga_child worker [--batch-size N]

Settings come from the environment (``Settings.to_env``, ``EVP_PROJECT`` naming the jobs
project). The coordinator's clock is the ISO 8601 time in ``FILE``, read at every use, so
the test that writes the file decides when retries and deadlines come due. Each loop is
catch-up, due timers (the coordinator), then a flush of the outbox. The child prints, and
flushes, one line per event the test synchronises on: ``ready`` once open, ``batch start N``
before a batch's transaction, ``batch committed N`` after its commit, ``tick fired N`` when
timers fired.

Imported, it is the oracle: :func:`predict` says what a job's plan must lead to (its final
status and the worker's effects, in order), independently of the engine, and
:func:`check_jobs` checks a run against it and against the engine's own invariants.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from events.adapters import postgres
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import LogRecord, end_offsets, read_range
from projections.runner import BatchOutcome
from events.store.source import Batch
from projections.sagas import store as saga_store
from projections.sagas.coordinator import SagaCoordinator
from projections.sagas.declaration import command_id
from projections.sagas.participant import ParticipantRunner
from tests.support.sagas import Jobs, jobs_module

#: Attempts the jobs project allows an action (transient failures) and a compensation.
ACTION_ATTEMPTS = 3
COMPENSATION_ATTEMPTS = 3
COMMAND_TYPE = "jobs.StepCommand"
PLATFORM = "evp.platform."

Effect = tuple[str, str]  #: (step, kind) of one effect of one job


# -- the oracle ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    """A job a test started: its id, its number of steps and the worker's plan for it."""

    job_id: str
    steps: int
    plan: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def saga_id(self) -> str:
        return f"saga-job{self.steps}-{self.job_id}"


def outcome(plan: Mapping[str, Sequence[str]], step: str, kind: str, attempt: int) -> str:
    """What the worker does with attempt ``attempt`` of ``step``'s ``kind`` (action, compensation)."""
    outcomes = list(plan.get(f"{step}/{kind}", ["ok"]))
    return outcomes[min(attempt, len(outcomes)) - 1]


@dataclass(frozen=True)
class Prediction:
    """What a job's plan must lead to: its final status, the worker's effects and the commands, in order."""

    status: str
    effects: list[Effect]
    commands: list[tuple[str, int, str]]  #: (step, attempt, kind)


def predict(job: Planned) -> Prediction:
    """The final status, effects and commands that ``job``'s plan must lead to.

    A model of the saga contract written without the engine: actions in order, a transient
    failure retried up to 3 attempts, a failure, an exhausted retry or a missing answer
    (silent, lost: the deadline) compensates the steps that took effect or may have, most
    recent first; a compensation that does not answer ``ok`` 3 times parks the saga. The
    worker applies an action on ``ok``/``lost`` and a compensation on ``ok`` only when the
    action took effect. (Compensations that take effect without an answer are not modelled:
    the worker does not dedupe a compensation retried after one.)
    """
    effects: list[Effect] = []
    commands: list[tuple[str, int, str]] = []
    applied: list[str] = []  # steps that took effect or may have, in order
    took_effect: set[str] = set()
    failed = False
    for index in range(job.steps):
        step = f"s{index}"
        for attempt in range(1, ACTION_ATTEMPTS + 1):
            commands.append((step, attempt, "action"))
            result = outcome(job.plan, step, "action", attempt)
            if result == "transient" and attempt < ACTION_ATTEMPTS:
                continue
            if result in ("ok", "lost"):
                effects.append((step, "action"))
                took_effect.add(step)
            if result in ("ok", "lost", "silent"):
                applied.append(step)
            failed = result != "ok"
            break
        if failed:
            break
    if not failed:
        return Prediction("completed", effects, commands)
    for step in reversed(applied):
        for attempt in range(1, COMPENSATION_ATTEMPTS + 1):
            commands.append((step, attempt, "compensation"))
            result = outcome(job.plan, step, "compensation", attempt)
            assert result != "lost", "a compensation applied without an answer is not modelled"
            if result == "ok":
                if step in took_effect:
                    effects.append((step, "compensation"))
                break
            if attempt == COMPENSATION_ATTEMPTS:
                return Prediction("parked", effects, commands)
    return Prediction("compensated", effects, commands)


def topic_timelines(h: Jobs) -> dict[str, list[tuple[int, str]]]:
    """stream -> (version, type) of its records on the topic, relay duplicates dropped, in one read.

    A duplicate (a version already seen) must repeat the same event: anything else fails.
    """
    ends = end_offsets(h.settings, h.settings.events_topic)
    seen: dict[str, dict[int, tuple[uuid.UUID, str]]] = {}
    for record in read_range(h.settings, h.settings.events_topic, h.store.codec,
                             {p: (0, end) for p, end in ends.items()}):
        assert isinstance(record, LogRecord), f"a record of the topic does not decode: {record}"
        versions = seen.setdefault(record.stream_id, {})
        first = versions.setdefault(record.version, (record.event_id, record.event_type))
        assert first == (record.event_id, record.event_type), (
            f"{record.stream_id} v{record.version} is {record.event_id} {record.event_type} on the topic, "
            f"and also {first}")
    return {stream: sorted((v, t) for v, (_, t) in versions.items()) for stream, versions in seen.items()}


def check_jobs(h: Jobs, started: Sequence[Planned], where: str = "") -> dict[str, int]:
    """Check a finished run of ``started`` against :func:`predict` and the engine's invariants.

    ``where`` is added to every message (a seed, a hypothesis example). Returns counts by
    final status.
    """
    states = h.states()
    effects = h.effects()
    assert sorted(states) == sorted(j.job_id for j in started), \
        f"{where}: saga instances {sorted(states)}, jobs started {sorted(j.job_id for j in started)}"
    # no (job, step, kind) effect twice, and none from the same command twice
    twice = [e for e, n in Counter(effects).items() if n > 1]
    assert not twice, f"{where}: effects applied twice: {twice}"
    with postgres.connect(h.settings.database_url, autocommit=True) as conn, conn.cursor() as cur:
        row = cur.execute("SELECT count(*), count(DISTINCT event_id) FROM evp_events").fetchone()
        effect_rows = cur.execute("SELECT job_id, step, kind, command_id FROM worker_participant.effects").fetchall()
    assert row is not None and row[0] == row[1], f"{where}: an event id appears twice in the ledger: {row}"
    by_command = Counter(str(r[3]) for r in effect_rows)
    assert all(n == 1 for n in by_command.values()), f"{where}: one command applied twice: {by_command}"
    effect_commands = {str(r[3]): (str(r[0]), str(r[1]), str(r[2])) for r in effect_rows}
    on_topic = topic_timelines(h)
    counts: Counter[str] = Counter()
    for job in started:
        state = states[job.job_id]
        label = f"{where}: job {job.job_id} ({job.steps} steps, plan {dict(job.plan)})"
        predicted = predict(job)
        status, expected = predicted.status, predicted.effects
        mine = [(s, k) for j, s, k in effects if j == job.job_id]
        counts[state.status] += 1
        assert state.saga_id == job.saga_id, label
        assert state.status in ("completed", "compensated", "parked"), f"{label}: ended {state.status}"
        assert state.status == status, f"{label}: ended {state.status} ({state.reason}), the model says {status}"
        actions = [s for s, k in mine if k == "action"]
        undone = [s for s, k in mine if k == "compensation"]
        if state.status == "completed":
            assert actions == [f"s{i}" for i in range(job.steps)] and not undone, f"{label}: effects {mine}"
            assert not state.compensated, f"{label}: completed with compensations {state.compensated}"
        elif state.status == "compensated":
            assert undone == list(reversed(actions)), f"{label}: compensated with effects {mine}"
        else:
            assert undone == list(reversed(actions))[:len(undone)], f"{label}: parked with effects {mine}"
            assert state.step not in state.compensated, f"{label}: parked on a compensated step {state.step}"
            assert "compensation" in (state.reason or "") and repr(state.step) in (state.reason or ""), \
                f"{label}: parked with reason {state.reason!r}"
        assert mine == expected, f"{label}: effects {mine}, the model says {expected}"

        # the ledger's timeline is the topic's, and the status row is the fold of the stream
        ledger = h.ledger_timeline(job.saga_id)
        assert ledger == on_topic.get(job.saga_id), f"{label}: ledger {ledger} != topic {on_topic.get(job.saga_id)}"
        folded = saga_store.fold_stream(h.store, job.saga_id)
        assert folded is not None, label
        assert (folded.status, folded.applied, folded.compensated) == (state.status, state.applied, state.compensated), \
            f"{label}: the row says {state}, the stream folds to {folded}"
        assert folded == state, f"{label}: the row's state {state} is not the fold of the stream {folded}"
        types = [t for _, t in ledger]
        assert types.count(PLATFORM + "SagaStarted") == 1, f"{label}: {types}"
        assert (PLATFORM + "SagaCompensated" in types) == (state.status == "compensated"), f"{label}: {types}"
        assert (PLATFORM + "SagaCompleted" in types) == (state.status == "completed"), f"{label}: {types}"

        # each command once, under the id derived from (saga, step, attempt, kind), right after its request
        stream = h.store.read_stream(job.saga_id, decrypt=False)
        issued: Counter[tuple[str, int, str]] = Counter()
        in_order: list[tuple[str, int, str]] = []
        for before, event in zip(stream, stream[1:]):
            if event.type != COMMAND_TYPE:
                continue
            step, attempt, kind = str(event.data["step"]), int(event.data["attempt"]), str(event.data["kind"])
            issued[(step, attempt, kind)] += 1
            in_order.append((step, attempt, kind))
            assert str(event.record.event_id) == str(command_id(job.saga_id, step, attempt, kind)), \
                f"{label}: command {step}/{attempt}/{kind} has id {event.record.event_id}"
            assert before.type in (PLATFORM + "SagaStepRequested", PLATFORM + "SagaCompensationRequested") and \
                before.data["command_id"] == str(event.record.event_id), f"{label}: command {event.record} follows {before.type}"
        assert issued and all(n == 1 for n in issued.values()), f"{label}: commands issued {dict(issued)}"
        assert in_order == predicted.commands, f"{label}: commands {in_order}, the model says {predicted.commands}"
        requests = [e for e in stream if e.type in (PLATFORM + "SagaStepRequested", PLATFORM + "SagaCompensationRequested")]
        assert len(requests) == sum(issued.values()), f"{label}: {len(requests)} requests, commands {dict(issued)}"
        for command, (j, s, k) in effect_commands.items():
            if j == job.job_id:
                assert any(str(e.record.event_id) == command and e.data["step"] == s and e.data["kind"] == k
                           for e in stream if e.type == COMMAND_TYPE), f"{label}: effect {s}/{k} of unknown command {command}"
    return dict(counts)


# -- the child processes -------------------------------------------------------------------
class FileClock:
    """The time written in a file (ISO 8601), read at every call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> datetime:
        return datetime.fromisoformat(self.path.read_text().strip())


def write_clock(path: Path, now: datetime) -> None:
    """Set a :class:`FileClock`'s time atomically (a reader never sees half a line)."""
    partial = path.with_suffix(".partial")
    partial.write_text(now.isoformat())
    partial.replace(path)


def say(line: str) -> None:
    print(line, flush=True)


def announced(process: Callable[[Batch], BatchOutcome], batch: Batch) -> BatchOutcome:
    """Say when a batch starts and when it committed, around ``process``."""
    say(f"batch start {len(batch.messages)}")
    outcome = process(batch)
    say(f"batch committed {outcome.applied}")
    return outcome


class AnnouncingCoordinator(SagaCoordinator):
    def process(self, batch: Batch) -> BatchOutcome:
        return announced(super().process, batch)


class AnnouncingWorker(ParticipantRunner):
    def process(self, batch: Batch) -> BatchOutcome:
        return announced(super().process, batch)


def _loop(consumer: SagaCoordinator | ParticipantRunner, settings: Settings) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EventStore.open(settings) as events, consumer:
        consumer.open()
        say("ready")
        while not stop.is_set():
            caught = consumer.catch_up()
            fired = consumer.tick().fired if isinstance(consumer, SagaCoordinator) else 0
            if fired:
                say(f"tick fired {fired}")
            sent = events.flush()
            if not (caught.applied or caught.skipped or fired or sent):
                time.sleep(0.02)  # idle: nothing new on the topic, no timer due
    say("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.saga_child")
    parser.add_argument("mode", choices=("coordinator", "worker"))
    parser.add_argument("--clock", type=Path, help="file holding the coordinator's time (ISO 8601)")
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    module = jobs_module()
    if args.mode == "coordinator":
        if args.clock is None:
            parser.error("the coordinator needs --clock")
        sagas = [cls() for cls in module.JOBS.values()]
        return _loop(AnnouncingCoordinator(settings, sagas, clock=FileClock(args.clock), batch_size=args.batch_size),
                     settings)
    return _loop(AnnouncingWorker(settings, module.Worker(), batch_size=args.batch_size), settings)


if __name__ == "__main__":
    sys.exit(main())
