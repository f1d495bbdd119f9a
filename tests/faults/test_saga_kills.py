"""SIGKILL the saga coordinator at random moments while jobs run: no command twice, no effect twice.

The coordinator and the worker run as child processes (:mod:`tests.support.saga_child`),
the coordinator's clock in a file this test moves. Each trial starts a few jobs with mixed
plans (failures, retries, lost answers, failing compensations), then starts the coordinator
and SIGKILLs it a few times, each time upon a batch line picked at random by a seeded
``random.Random`` (a ``batch start`` line: the batch is in flight; a ``batch committed``
line: between batches), restarting it after each kill. At the end the jobs are driven to
completion in this process (:meth:`Jobs.drive`) and checked with the oracle the property
test uses (:func:`tests.support.saga_child.check_jobs`) — each job ends as its plan's model
says, every command once under its derived id, no effect twice, the ledger's timelines on the
topic and the status rows equal to the streams' folds — and with the topic-versus-ledger
oracle of :mod:`tests.faults.helpers`.
"""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from events.settings import Settings
from tests.faults.helpers import assert_topic_matches_ledger, read_ledger, read_topic, summary_line
from tests.support.saga_child import Planned, check_jobs, outcome, write_clock
from tests.support.sagas import PROJECT, Clock, Jobs

pytestmark = [pytest.mark.services, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
TRIALS = 6
KILLS = 3
JOBS_PER_TRIAL = 4
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
LINE_TIMEOUT = 1.0  #: seconds to wait for a child's line before moving the clock
READY_TIMEOUT = 60.0
MAX_JUMP = timedelta(seconds=30)  #: the most the clock moves at once (a step's deadline is a minute)

ACTION_OUTCOMES = ["ok"] * 4 + ["fail", "transient", "silent", "lost"]
COMPENSATION_OUTCOMES = ["ok"] * 3 + ["fail", "transient", "silent"]


class Child:
    """``python -m tests.support.saga_child MODE``, its output lines read by a thread into a queue."""

    def __init__(self, settings: Settings, mode: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")}
        env.update(settings.to_env(), PYTHONPATH=str(REPO))
        self.mode = mode
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.saga_child", mode, *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line, or None when none came within ``timeout``; fails if the child ended."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            raise AssertionError(f"the {self.mode} exited ({self.proc.wait()}):\n" + "\n".join(self.lines[-40:]))
        self.lines.append(line)
        return line

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self.next_line(min(left, LINE_TIMEOUT))
            if line is not None and line.startswith(text):
                return
        raise AssertionError(f"the {self.mode} did not say {text!r} within {timeout:.0f}s:\n" + "\n".join(self.lines[-40:]))

    def kill(self) -> list[str]:
        """SIGKILL it; every line it printed."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return self.lines


def _plan(rng: random.Random, steps: int) -> dict[str, list[str]]:
    plan: dict[str, list[str]] = {}
    for i in range(steps):
        if rng.random() < 0.3:
            plan[f"s{i}/action"] = rng.choices(ACTION_OUTCOMES, k=rng.randint(1, 3))
        if rng.random() < 0.4:
            plan[f"s{i}/compensation"] = rng.choices(COMPENSATION_OUTCOMES, k=rng.randint(1, 3))
    return plan


def _in_flight(lines: Sequence[str]) -> bool:
    """Whether the last batch the coordinator said anything about had started and not committed."""
    batches = [line for line in lines if line.startswith("batch ")]
    return bool(batches) and batches[-1].startswith("batch start")


def test_a_coordinator_killed_at_random_moments_issues_each_command_once(settings: Settings, tmp_path: Path) -> None:
    seed = int(os.environ.get("EVP_TEST_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    where = f"seed {seed}"
    jobs_settings = settings.with_(project=PROJECT)
    clock_file = tmp_path / "clock"
    now = START
    write_clock(clock_file, now)

    def advance(by: timedelta) -> None:
        """Move the children's clock, never past the deadline of a command whose answer is still to come.

        A deadline passed while its answer is on the way would compensate a step the model
        says succeeds: the clock stops short of every deadline the plan does not mean to
        expire (``silent``, ``lost``) until the coordinator has read the answer. A jump is
        at most :data:`MAX_JUMP`, well under a deadline, so a decision still in flight (its
        new deadline not visible yet) cannot be overtaken either.
        """
        nonlocal now
        if by <= timedelta(0):
            return
        target = now + min(by, MAX_JUMP)
        for state in h.states().values():
            timer = state.timer
            if state.awaiting and timer is not None and timer.kind == "deadline" and \
                    outcome(planned[state.key].plan, state.step, state.phase, state.attempt) not in ("silent", "lost"):
                target = min(target, datetime.fromisoformat(timer.due_at) - timedelta(seconds=1))
        if target > now:
            now = target
            write_clock(clock_file, now)

    h = Jobs(jobs_settings, Clock(now))
    started: list[Planned] = []
    planned: dict[str, Planned] = {}

    def start_job(job_id: str) -> None:
        steps = rng.randint(1, 6)
        job = Planned(job_id, steps, _plan(rng, steps))
        h.start(job.job_id, job.steps, job.plan)
        if rng.random() < 0.3:
            h.start(job.job_id, job.steps, job.plan)  # a duplicated start
        h.store.flush()
        started.append(job)
        planned[job.job_id] = job

    worker = Child(jobs_settings, "worker")
    kills = in_flight = batch_lines = nudges = fillers = 0
    try:
        worker.wait_for("ready", READY_TIMEOUT)
        for trial in range(TRIALS):
            for index in range(JOBS_PER_TRIAL):
                start_job(f"t{trial}-{index}")
            for _ in range(KILLS):
                coordinator = Child(jobs_settings, "coordinator", "--clock", str(clock_file), "--batch-size",
                                    str(rng.choice([3, 10, 50])))
                try:
                    coordinator.wait_for("ready", READY_TIMEOUT)
                    target, seen, quiet = rng.randint(1, 12), 0, 0
                    while seen < target:
                        line = coordinator.next_line(LINE_TIMEOUT)
                        if line is None:  # nothing moves: let time pass, and after a while bring new work
                            quiet += 1
                            nudges += 1
                            advance(MAX_JUMP if quiet % 3 == 0 else timedelta(seconds=5))
                            if quiet % 6 == 0:
                                fillers += 1
                                start_job(f"filler-{fillers}")
                            assert quiet < 40, f"{where}: the coordinator did nothing for {quiet} waits:\n" + \
                                "\n".join(coordinator.lines[-40:])
                        elif line.startswith("batch "):
                            seen += 1
                            batch_lines += 1
                            if seen < target:  # (upon the target line: kill at once)
                                advance(timedelta(seconds=rng.choice([0, 0, 0, 1, 3, 5])))  # retries, deadlines come due
                finally:
                    lines = coordinator.kill()
                kills += 1
                in_flight += _in_flight(lines)
                advance(timedelta(seconds=rng.choice([0, 2, 5, 30])))  # timers come due while it is down
    finally:
        worker.kill()

    try:
        finished = sum(s.status in ("completed", "compensated", "parked") for s in h.states().values())
        h.clock.now = now
        states = h.drive([j.job_id for j in started], rounds=200)  # it stops as soon as all are done
        assert len(states) == len(started), f"{where}: {len(states)} sagas for {len(started)} jobs"
        counts = check_jobs(h, started, where)
    finally:
        h.close()
    topic = assert_topic_matches_ledger(read_topic(settings), read_ledger(settings.database_url))
    print(summary_line("saga kills", {"seed": seed, "kills": kills, "in_flight": in_flight, "batch_lines": batch_lines,
                                      "nudges": nudges, "jobs": len(started),
                                      "finished_before_the_drive": finished, **_prefixed(counts),
                                      "events": topic.events, "republished": topic.duplicates}))
    assert kills == TRIALS * KILLS
    assert in_flight >= 1, f"{where}: none of the {kills} kills landed while a batch was in flight"


def _prefixed(counts: Mapping[str, int]) -> dict[str, int]:
    return {f"jobs_{status}": n for status, n in sorted(counts.items())}
