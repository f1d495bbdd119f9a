"""A property of the saga engine against the real services: any mix of jobs and plans ends as the model says.

Each example starts 1 to 4 jobs of 1 to 6 steps in a fresh database and topic prefix, with
plans drawn from the worker's outcomes (mostly ``ok``) and start events delivered more than
once (the same event id again, or a new one), drives them with :meth:`Jobs.drive`, and checks
:func:`tests.support.saga_child.check_jobs`: every saga ends completed, compensated or
parked, exactly as the plan's model predicts; completed means one action effect per step and
no compensation; compensated means every action effect undone once, in reverse order; no
effect twice; the ledger's saga timeline is the topic's; the status row is the fold of the
saga's stream.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from events.settings import Settings
from tests.conftest import private_settings
from tests.support.saga_child import Planned, check_jobs, predict
from tests.support.sagas import jobs

pytestmark = pytest.mark.services

#: Weighted outcomes: most attempts succeed, so most jobs finish.
ACTION_OUTCOMES = ["ok"] * 4 + ["fail", "transient", "transient", "silent", "lost"]
#: A compensation that takes effect without answering would be applied again by its retry
#: (the worker does not dedupe compensations), so ``lost`` is left out here.
COMPENSATION_OUTCOMES = ["ok"] * 3 + ["fail", "transient", "silent"]


@dataclass(frozen=True)
class Start:
    """One delivery of a job's start event (a second one may carry the first one's event id)."""

    job: Planned
    event_id: uuid.UUID


@st.composite
def planned_jobs(draw: st.DrawFn, index: int) -> Planned:
    steps = draw(st.integers(1, 6))
    plan: dict[str, list[str]] = {}
    for i in range(steps):
        if draw(st.sampled_from([False] * 4 + [True])):
            plan[f"s{i}/action"] = draw(st.lists(st.sampled_from(ACTION_OUTCOMES), min_size=1, max_size=3))
        if draw(st.sampled_from([False, False, True])):
            plan[f"s{i}/compensation"] = draw(st.lists(st.sampled_from(COMPENSATION_OUTCOMES), min_size=1, max_size=3))
    return Planned(f"j{index}", steps, plan)


@st.composite
def workloads(draw: st.DrawFn) -> list[Start]:
    count = draw(st.integers(1, 4))
    starts: list[Start] = []
    for index in range(count):
        job = draw(planned_jobs(index))
        first = uuid.uuid5(uuid.NAMESPACE_URL, f"{job.job_id}/0")
        starts.append(Start(job, first))
        for copy in range(1, draw(st.integers(0, 2)) + 1):  # duplicated deliveries: the same event, or a new one
            same = draw(st.booleans())
            starts.append(Start(job, first if same else uuid.uuid5(uuid.NAMESPACE_URL, f"{job.job_id}/{copy}")))
    return draw(st.permutations(starts))


@hypothesis_settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads())
def test_any_mix_of_jobs_ends_as_the_model_says(workload: list[Start], services: Settings,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    started = list({s.job.job_id: s.job for s in workload}.values())
    where = f"starts {[(s.job.job_id, str(s.event_id)[:8]) for s in workload]}"
    with private_settings(services, tmp_path_factory.mktemp("saga-property")) as fresh, jobs(fresh) as h:
        for start in workload:
            h.start(start.job.job_id, start.job.steps, start.job.plan, event_id=start.event_id)
        states = h.drive([j.job_id for j in started], rounds=200)  # it stops as soon as all are done
        assert len(states) == len(started), f"{where}: sagas {sorted(states)}"
        for status, count in check_jobs(h, started, where).items():
            event(f"jobs {status}", count)
        event("duplicated starts", len(workload) - len(started))


def test_the_model_agrees_with_the_examples_of_the_coordinator_tests() -> None:
    """The oracle itself, on plans whose outcome the coordinator tests spell out."""
    def outcome(job: Planned) -> tuple[str, list[tuple[str, str]]]:
        predicted = predict(job)
        return predicted.status, predicted.effects

    assert outcome(Planned("a", 3)) == ("completed", [("s0", "action"), ("s1", "action"), ("s2", "action")])
    assert outcome(Planned("b", 4, {"s2/action": ["fail"]})) == (
        "compensated", [("s0", "action"), ("s1", "action"), ("s1", "compensation"), ("s0", "compensation")])
    assert outcome(Planned("c", 3, {"s1/action": ["lost"]})) == (
        "compensated", [("s0", "action"), ("s1", "action"), ("s1", "compensation"), ("s0", "compensation")])
    assert outcome(Planned("d", 2, {"s1/action": ["silent"]})) == (
        "compensated", [("s0", "action"), ("s0", "compensation")])
    assert outcome(Planned("e", 2, {"s1/action": ["transient"]})) == (
        "compensated", [("s0", "action"), ("s0", "compensation")])
    assert outcome(Planned("g", 3, {"s1/action": ["fail"], "s0/compensation": ["fail"]})) == (
        "parked", [("s0", "action")])
    assert outcome(Planned("h", 3, {"s2/action": ["fail"], "s1/compensation": ["transient", "transient", "ok"]})) == (
        "compensated", [("s0", "action"), ("s1", "action"), ("s1", "compensation"), ("s0", "compensation")])
    assert predict(Planned("f", 2, {"s1/action": ["transient", "transient", "ok"]})).commands == [
        ("s0", 1, "action"), ("s1", 1, "action"), ("s1", 2, "action"), ("s1", 3, "action")]
    assert predict(Planned("i", 2, {"s1/action": ["transient"], "s0/compensation": ["silent", "ok"]})).commands == [
        ("s0", 1, "action"), ("s1", 1, "action"), ("s1", 2, "action"), ("s1", 3, "action"),
        ("s0", 1, "compensation"), ("s0", 2, "compensation")]
