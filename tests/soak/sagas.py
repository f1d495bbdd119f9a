"""The soak's saga lane: jobs coordinated and answered by evp's own commands while the faults go on.

The jobs test project (``tests/support/saga_project``: sagas of 1 to 6 steps whose worker
follows a plan carried in the job) runs on a database and topic prefix of its own, with
its own relay, ``evp sagas run`` as the coordinator and ``evp sagas participant worker`` as
the worker, all as child processes the soak can SIGKILL (``kill-coordinator``); the
restarts of Kafka and PostgreSQL reach them as well. Contract:

1. each trial starts a few jobs whose plans use only outcomes that answer (ok, a business
   failure, a transient failure): the coordinator runs on real time, so a deadline (a
   minute) would only pass if an answer were lost, which is then a finding, not noise;
2. after the trial, every job started so far must settle (completed, compensated or
   parked) within :data:`SETTLE_BOUND`;
3. the oracle is the saga tests' (:func:`tests.support.saga_child.check_jobs`): each job
   ends as its plan's model says, every command once under its derived id, no effect twice,
   the ledger's timelines on the topic, the status rows equal to the streams' folds. A
   violation is counted with its message, not raised, so the soak's table says how many.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from events.settings import Settings
from tests.support.saga_child import Planned, check_jobs
from tests.support.sagas import PROJECT, Jobs

#: Every job started must reach a final state within this many seconds of the trial's end.
SETTLE_BOUND = 90.0
ACTIONS = ["ok"] * 5 + ["fail", "transient"]
COMPENSATIONS = ["ok"] * 4 + ["fail", "transient"]
NAMES = ("sagarelay", "coordinator", "worker")
FINAL = ("completed", "compensated", "parked")


@dataclass
class SagaLane:
    """The lane's settings, its harness (to start jobs and to check them) and the jobs so far."""

    settings: Settings
    jobs: Jobs
    rng: random.Random
    started: list[Planned] = field(default_factory=list)

    def harness(self) -> Jobs:
        """The harness, opened again when a restart of PostgreSQL broke its connection."""
        conn = self.jobs.store.ledger.connection
        try:
            alive = not conn.closed and conn.execute("SELECT 1").fetchone() is not None
        except Exception:  # noqa: BLE001 - a restart of the server ended the session
            alive = False
        if not alive:
            try:
                self.jobs.close()
            except Exception:  # noqa: BLE001 - it is broken already
                pass
            self.jobs = Jobs(self.settings)
        return self.jobs

    def start_jobs(self, count: int) -> None:
        """Step 1."""
        for _ in range(count):
            steps = 3  # the project declares one saga, Job3, for jobs of three steps
            plan: dict[str, list[str]] = {}
            for i in range(steps):
                if self.rng.random() < 0.3:
                    plan[f"s{i}/action"] = self.rng.choices(ACTIONS, k=self.rng.randint(1, 2))
                if self.rng.random() < 0.3:
                    plan[f"s{i}/compensation"] = self.rng.choices(COMPENSATIONS, k=self.rng.randint(1, 2))
            job = Planned(f"j{uuid.uuid4().hex[:10]}", steps, plan)
            self.harness().start(job.job_id, job.steps, job.plan)
            self.started.append(job)

    def settled(self) -> bool:
        """Step 2: whether every job started so far is in a final state (waits up to the bound)."""
        deadline = time.monotonic() + SETTLE_BOUND
        while time.monotonic() < deadline:
            try:
                states = self.harness().states()
            except Exception:  # noqa: BLE001 - the database may be restarting: ask again
                states = {}
            if all(states.get(j.job_id) is not None and states[j.job_id].status in FINAL for j in self.started):
                return True
            time.sleep(0.3)
        return False

    def violations(self) -> list[str]:
        """Step 3: the oracle's findings (empty when every promise held)."""
        if not self.settled():
            known = self.harness().states()
            waiting = [j.job_id for j in self.started if (s := known.get(j.job_id)) is None or s.status not in FINAL]
            return [f"{len(waiting)} job(s) did not settle within {SETTLE_BOUND:.0f}s: {', '.join(waiting[:5])}"]
        try:
            check_jobs(self.harness(), self.started, "saga lane")
        except AssertionError as err:
            return [str(err)]
        return []


@contextmanager
def saga_lane(base: Settings, folder: Path, rng: random.Random) -> Iterator[SagaLane]:
    """A database and prefix of the lane's own, its harness open; removed afterwards."""
    from tests.conftest import create_database, delete_topics, drop_database

    url = create_database(base)
    settings = base.with_(database_url=url, topic_prefix=f"sagas{uuid.uuid4().hex[:8]}", home=folder / "home",
                          kek_file=folder / "home" / "kek", project=PROJECT)
    jobs = Jobs(settings)
    try:
        jobs.store.flush()
        yield SagaLane(settings, jobs, rng)
    finally:
        jobs.close()
        delete_topics(settings)
        drop_database(base, url)
