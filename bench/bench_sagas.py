"""What coordination costs: three-step sagas driven to the end vs plain appends of the same events.

    python bench/bench_sagas.py [--small | --large] [--profile]

Runs against the services ``platform/services.py up`` started (or ``EVP_KAFKA`` /
``EVP_DATABASE_URL``), in a throwaway database and topic prefix that it removes again, with
its own project (``bench/saga_project``: a three-step ``job`` saga and a ``worker``
participant that fails about one job in ten, at a step derived from the job id, so about a
tenth of the sagas compensate). Measured in the same run:

- sagas: every ``JobRequested`` appended through ``EventStore`` (100 per append), then rounds
  of {relay ``flush``, ``SagaCoordinator.catch_up``, ``flush``, ``ParticipantRunner.catch_up``}
  until every saga's status row is completed or compensated, and a last ``flush``: the wall
  time from the first start append until then, as sagas/s and events/s (every event the run
  wrote: starts, the saga streams' transitions and commands, the worker's answers);
- the baseline: the very same events (decoded from the ledger, new ids) appended again with
  plain ``EventStore.append`` calls, grouped as the run appended them (one append per stream
  per transaction of the run), each its own transaction, then ``flush``; plus the SDK's
  validate + encode of those events alone, no I/O;
- trigger -> command latency: from a start event's ``recorded_at`` in the ledger to the
  ``recorded_at`` of its saga's first command (``recorded_at`` is the appending transaction's
  start). All starts are appended before the coordinator runs, so this includes the wait
  behind the backlog: it is the latency of a burst, not of a lone saga;
- where the time goes: start appends, relay, coordinator and participant seconds.

``--profile`` also runs the drive under cProfile and prints its top costs to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from _support import throwaway, timed  # noqa: E402  (also puts the repo on sys.path)
from events.adapters import postgres
from events.event import NO_STREAM, Event, ExpectedVersion
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from projections.sagas import store as saga_store
from projections.sagas.coordinator import SagaCoordinator
from projections.sagas.participant import ParticipantRunner

PROJECT = Path(__file__).resolve().parent / "saga_project"
SIZES = {"small": 1_000, "large": 10_000}
START_BATCH = 100  # JobRequested events per append
WARM_UP = 20  # sagas driven to the end before any timing (connections, consumers, schemas)
MAX_ROUNDS = 40
COMMAND_TYPE = "benchjobs.StepCommand"
STEP_NAMES = ("s1", "s2", "s3")  # as bench/saga_project/benchjobs/sagas.py declares them
T = TypeVar("T")


# -- the project ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Declarations:
    saga: Any  # benchjobs.sagas.Job (instantiated)
    worker: Any  # benchjobs.sagas.Worker (instantiated)
    failing_step: Callable[[str], str | None]


def declarations() -> Declarations:
    """The bench project's saga, participant and failure rule, imported as evp imports a project's."""
    project = Project.read(PROJECT)
    saga_class = project.load("sagas", "job")
    worker_class = project.load("participants", "worker")
    failing: Callable[[str], str | None] = project.load("sagas", "benchjobs.sagas:failing_step")
    return Declarations(saga_class(), worker_class(), failing)


def job_ids(tag: str, count: int) -> list[str]:
    return [f"{tag}-{i:06d}" for i in range(count)]


def streams_of(tag: str) -> list[str]:
    """LIKE patterns of every stream one run (``tag``: the job ids' prefix) writes."""
    return [f"start-{tag}-%", f"saga-job-{tag}-%", f"work-{tag}-%"]


# -- driving sagas ---------------------------------------------------------------------------
@dataclass
class Phases:
    """Seconds spent in each part of the drive."""

    starts: float = 0.0
    relay: float = 0.0
    coordinator: float = 0.0
    participant: float = 0.0
    status: float = 0.0
    rounds: int = 0

    def clock(self, part: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return work()
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - started)


@dataclass
class Drive:
    tag: str
    sagas: int
    seconds: float
    phases: Phases
    statuses: dict[str, int]
    start_ids: dict[str, uuid.UUID] = field(default_factory=dict)


class Harness:
    """A store to start jobs with, the coordinator and the worker, all in this process."""

    def __init__(self, settings: Settings, found: Declarations) -> None:
        self.settings = settings
        self.found = found
        self.store = EventStore.open(settings)
        self.coordinator = SagaCoordinator(settings, [found.saga])
        self.worker = ParticipantRunner(settings, found.worker)

    def close(self) -> None:
        for closer in (self.coordinator, self.worker, self.store):
            closer.close()

    def statuses(self, tag: str) -> dict[str, int]:
        with postgres.connect(self.settings.database_url, autocommit=True) as conn:
            rows = conn.execute(
                f"SELECT status, count(*) FROM {saga_store.DEFAULT_SCHEMA}.evp_sagas WHERE key LIKE %s GROUP BY status",
                (f"{tag}-%",)).fetchall()
        return {str(status): int(count) for status, count in rows}

    def drive(self, tag: str, count: int) -> Drive:
        """Start ``count`` jobs and run rounds until all are completed or compensated."""
        phases = Phases()
        jobs = job_ids(tag, count)
        starts = {job: Event("JobRequested", {"job_id": job}) for job in jobs}
        statuses: dict[str, int] = {}
        def start_all() -> None:
            for b in range(0, count, START_BATCH):
                self.store.append(f"start-{tag}-{b // START_BATCH}", [starts[job] for job in jobs[b:b + START_BATCH]],
                                  NO_STREAM)

        began = time.perf_counter()
        phases.clock("starts", start_all)
        while True:
            phases.rounds += 1
            phases.clock("relay", self.store.flush)
            phases.clock("coordinator", self.coordinator.catch_up)
            phases.clock("relay", self.store.flush)
            phases.clock("participant", self.worker.catch_up)
            statuses = phases.clock("status", lambda: self.statuses(tag))
            done = statuses.get("completed", 0) + statuses.get("compensated", 0)
            if done >= count:
                break
            if statuses.get("parked") or phases.rounds >= MAX_ROUNDS:
                raise SystemExit(f"sagas did not finish: {statuses} after {phases.rounds} rounds")
        phases.clock("relay", self.store.flush)  # the last transitions reach the topic, as the baseline's do
        seconds = time.perf_counter() - began
        return Drive(tag, count, seconds, phases, statuses, {job: e.event_id for job, e in starts.items()})


# -- what the run wrote ----------------------------------------------------------------------
@dataclass(frozen=True)
class Written:
    """The run's events from the ledger, as appended: one group per (stream, transaction)."""

    groups: list[tuple[str, list[Event]]]
    by_kind: dict[str, int]

    @property
    def events(self) -> int:
        return sum(len(events) for _, events in self.groups)

    @property
    def appends(self) -> int:
        return len(self.groups)


def written(store: EventStore, tag: str) -> Written:
    """The events the run wrote, decoded, grouped by the append that wrote them (in ledger order).

    Within one transaction of the run a stream gets at most one append (a saga has one
    command in flight, a job one answer), so (stream, ``recorded_at``) names the append.
    """
    rows = store.ledger.connection.execute(
        "SELECT stream_id, array_agg(position ORDER BY version) FROM evp_events WHERE stream_id LIKE ANY(%s)"
        " GROUP BY stream_id, recorded_at ORDER BY min(position)", (streams_of(tag),)).fetchall()
    positions = [p for _, group in rows for p in group]
    records = {r.position: r for r in store.ledger.read_positions(positions)}
    groups: list[tuple[str, list[Event]]] = []
    by_kind: dict[str, int] = {}
    for stream_id, group in rows:
        events = []
        for position in group:
            record = records[position]
            events.append(Event(record.event_type, store.decode(record, decrypt=False).data, actor=record.actor,
                                occurred_at=record.occurred_at))
        groups.append((str(stream_id), events))
        kind = str(stream_id).split("-", 1)[0]
        by_kind[kind] = by_kind.get(kind, 0) + len(events)
    return Written(groups, by_kind)


def expected_writes(failing_step: Callable[[str], str | None], jobs: Sequence[str]) -> dict[str, int]:
    """Events per kind of stream (start, saga, work) and appends a correct run writes, from the failure rule.

    A job failing at step k (1-based) of n: SagaStarted, k-1 times (requested, command,
    succeeded), requested + command + failed, k-1 times (compensation requested, command,
    done), SagaCompensated; its worker answers k actions and k-1 compensations. A job that
    succeeds: SagaStarted, n times (requested, command, succeeded), SagaCompleted; n answers.
    The coordinator appends once per decision (the start and each answer), the worker once per answer.
    """
    n = len(STEP_NAMES)
    saga = work = 0
    for job in jobs:
        failed = failing_step(job)
        if failed is None:
            saga, work = saga + 2 + 3 * n, work + n
        else:
            k = STEP_NAMES.index(failed) + 1
            saga, work = saga + 5 + 6 * (k - 1), work + 2 * k - 1
    starts = -(-len(jobs) // START_BATCH)
    return {"start": len(jobs), "saga": saga, "work": work, "appends": starts + (len(jobs) + work) + work}


def plain_appends(store: EventStore, run: Written) -> float:
    """The run's events again: the same appends, to ``plain-`` streams, each its own transaction, then flush."""
    versions: dict[str, int] = {}

    def work() -> None:
        for stream_id, events in run.groups:
            stream = f"plain-{stream_id}"
            current = versions.get(stream)
            expected: ExpectedVersion = NO_STREAM if current is None else current
            versions[stream] = store.append(stream, events, expected).last_version
        store.flush()

    return timed(work)


def encode_only(store: EventStore, run: Written) -> float:
    events = [e for _, group in run.groups for e in group]
    for first in {e.type: e for e in events}.values():
        store.prepare(first)  # schema look-ups and registrations, outside the timing
    return timed(lambda: [store.prepare(e) for e in events])


def latencies(store: EventStore, drive: Drive) -> list[float]:
    """Seconds from each start's ``recorded_at`` to its saga's first command's."""
    conn = store.ledger.connection
    started: dict[uuid.UUID, datetime] = dict(conn.execute(
        "SELECT event_id, recorded_at FROM evp_events WHERE event_id = ANY(%s)", (list(drive.start_ids.values()),)
    ).fetchall())
    commanded: dict[str, datetime] = dict(conn.execute(
        "SELECT stream_id, min(recorded_at) FROM evp_events WHERE stream_id LIKE %s AND event_type = %s"
        " GROUP BY stream_id", (f"saga-job-{drive.tag}-%", COMMAND_TYPE)).fetchall())
    out = []
    for job, event_id in drive.start_ids.items():
        command = commanded.get(f"saga-job-{job}")
        if command is None:
            raise SystemExit(f"saga of {job} issued no command")
        out.append((command - started[event_id]).total_seconds())
    return out


def percentile(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@contextmanager
def profiled(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profile, stream=out).strip_dirs().sort_stats(order).print_stats(30)
            print(f"\n--- cProfile of the saga drive, by {order} ---\n{out.getvalue()}", file=sys.stderr)


# -- report ------------------------------------------------------------------------------------
def report(size_name: str, drive: Drive, expected: dict[str, int], writes: dict[str, int], run: Written,
           plain: float, encoding: float, waits: Sequence[float]) -> str:
    n, events, appends = drive.sagas, run.events, run.appends
    kinds = ", ".join(f"{name} {run.by_kind.get(key, 0):,}" for key, name in
                      (("start", "starts"), ("saga", "saga streams"), ("work", "answers")))
    outcome = ", ".join(f"{k} {v:,}" for k, v in sorted(drive.statuses.items()))
    found = {**{k: run.by_kind.get(k, 0) for k in ("start", "saga", "work")}, "appends": appends}
    exact = "exactly the events and appends the failure rule predicts" if found == writes else \
        f"MISMATCH: the failure rule predicts {writes}"
    lines = [
        f"### evp saga benchmark ({size_name}: {n:,} three-step sagas, ~1 in 10 failing)",
        "",
        f"Outcome: {outcome} (expected completed {expected['completed']:,}, compensated {expected['compensated']:,});"
        f" {events:,} events in {appends:,} appends ({kinds}): {exact}; {drive.phases.rounds} rounds.",
        "",
        "| measurement | sagas | events | seconds | sagas/s | events/s | vs plain appends |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| sagas, first start append -> all terminal, + flush | {n:,} | {events:,} | {drive.seconds:.2f} |"
        f" {n / drive.seconds:,.0f} | {events / drive.seconds:,.0f} | {plain / drive.seconds:.2f}x |",
        f"| plain appends of the same events ({appends:,} appends, 1 per transaction), + flush (baseline) |"
        f" {n:,} | {events:,} | {plain:.2f} | {n / plain:,.0f} | {events / plain:,.0f} | 1.00x |",
        f"| (validate + encode of the same events only, no I/O) | {n:,} | {events:,} | {encoding:.2f} |"
        f" {n / encoding:,.0f} | {events / encoding:,.0f} | {plain / encoding:.2f}x |",
        "",
        "| where the saga run's time goes | seconds | share |",
        "|---|---:|---:|",
    ]
    p = drive.phases
    for name, seconds in (("start appends (EventStore.append, 100 per append)", p.starts),
                          ("relay (EventStore.flush)", p.relay),
                          ("coordinator (SagaCoordinator.catch_up)", p.coordinator),
                          ("participant (ParticipantRunner.catch_up)", p.participant),
                          ("status polls (count of terminal rows)", p.status)):
        lines.append(f"| {name} | {seconds:.2f} | {seconds / drive.seconds:.0%} |")
    lines += [
        "",
        f"| trigger -> first command (ledger recorded_at, {len(waits):,} sagas started in one burst) | p50 | p95 | max |",
        "|---|---:|---:|---:|",
        f"| latency, ms | {percentile(waits, 50) * 1000:,.0f} | {percentile(waits, 95) * 1000:,.0f} |"
        f" {max(waits) * 1000:,.0f} |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--small", dest="size", action="store_const", const="small", help="1,000 sagas (default)")
    group.add_argument("--large", dest="size", action="store_const", const="large", help="10,000 sagas")
    parser.add_argument("--profile", action="store_true", help="cProfile the saga drive; top costs to stderr")
    args = parser.parse_args(argv)
    size_name: str = args.size or "small"
    count = SIZES[size_name]
    found = declarations()
    jobs = job_ids("j", count)
    failing = sum(1 for job in jobs if found.failing_step(job) is not None)
    expected = {"completed": count - failing, "compensated": failing}
    writes = expected_writes(found.failing_step, jobs)
    with throwaway(Settings.from_env()) as base:
        settings = base.with_(project=PROJECT)
        harness = Harness(settings, found)
        try:
            harness.drive("w", WARM_UP)  # connections, consumers, schema registrations: outside the timings
            with profiled(args.profile):
                drive = harness.drive("j", count)  # the same ids as ``jobs``
        finally:
            harness.close()
        if {k: drive.statuses.get(k, 0) for k in expected} != expected:
            raise SystemExit(f"unexpected outcome {drive.statuses}, expected {expected}")
        with EventStore.open(settings) as store:
            run = written(store, drive.tag)
            waits = latencies(store, drive)
            encoding = encode_only(store, run)
            plain = plain_appends(store, run)
    print(report(size_name, drive, expected, writes, run, plain, encoding, waits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
