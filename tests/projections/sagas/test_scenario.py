"""The saga contract (projections.sagas.machine), given / when / then through the in-memory SagaScenario.

Pure tests: no services. Every expected value is derived from the declaration (its retry
policies, deadlines and the commands' idempotency keys), never hard-coded.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest

from events.errors import NotFound
from projections.sagas.declaration import ACTION, COMPENSATION, Builder, Command, Retry, Saga, SagaContext, Step
from projections.sagas.machine import (
    COMPENSATED, COMPLETED, MARK_COMPENSATED, PARKED, RESUME, RETRY_STEP, RUNNING, SagaRefused, Transition,
)
from projections.sagas.testing import SagaScenario

KEY = "j1"
US = timedelta(microseconds=1)
CURRENT = "<current>"  #: answer the command in flight


class Boom(Exception):
    pass


def build(name: str, phase: str, raising: set[int] | None = None) -> Builder:
    """A command for ``name``'s action or compensation; raises Boom on the attempts in ``raising``."""
    def make(ctx: SagaContext) -> Command:
        if raising is not None and ctx.attempt in raising:
            raise Boom(f"cannot build {name} attempt {ctx.attempt}")
        return Command("Do" if phase == ACTION else "Undo",
                       {"job_id": ctx.key, "step": name, "attempt": ctx.attempt, "action_command_id": ctx.command_id,
                        "start": dict(ctx.start), "replies": {k: dict(v) for k, v in ctx.replies.items()}})
    return make


def step(name: str, *, compensable: bool = True, **changes: Any) -> Step:
    fields: dict[str, Any] = dict(
        action=build(name, ACTION), compensation=build(name, COMPENSATION) if compensable else None,
        succeeded_on=("Done",), failed_on=("Failed",), transient_on=("Flaky",),
        compensated_on=("Undone",) if compensable else (), compensation_failed_on=("UndoFailed",) if compensable else ())
    fields.update(changes)
    return Step(name, **fields)


def saga_of(*steps: Step, compensation_retry: Retry | None = None) -> Saga:
    class Job(Saga):
        name = "job"
        starts_on = "JobRequested"
        correlation = "job_id"

    Job.steps = steps
    if compensation_retry is not None:
        Job.compensation_retry = compensation_retry
    return Job()


def started(saga: Saga, **start: Any) -> SagaScenario:
    scenario = SagaScenario(saga)
    scenario.when("JobRequested", {"job_id": KEY, **start})
    return scenario


def answer(scenario: SagaScenario, reply: str, *, command_id: str | None = CURRENT, key: str = KEY,
           **data: Any) -> list[Command]:
    """A participant's reply; by default it names the command in flight in its ``command_id`` field."""
    body: dict[str, Any] = {"job_id": key, **data}
    if command_id == CURRENT:
        body["command_id"] = scenario.state(key).command_id
    elif command_id is not None:
        body["command_id"] = command_id
    return scenario.when(reply, body)


def of(commands: list[Command]) -> list[tuple[str, str, int]]:
    """(type, step, attempt) of each command."""
    return [(c.type, str(c.data["step"]), int(c.data["attempt"])) for c in commands]


def requested(scenario: SagaScenario, step_name: str, kind: str = "SagaStepRequested") -> list[Transition]:
    return [t for t in scenario.transitions(KEY) if t.type == kind and t.data["step"] == step_name]


def snapshot(scenario: SagaScenario) -> tuple[Any, ...]:
    return scenario.state(KEY), scenario.timeline(KEY), scenario.commands_of(KEY)


def done(scenario: SagaScenario) -> list[Mapping[str, Any]]:
    return [t.data for t in scenario.transitions(KEY) if t.type == "SagaCompensationDone"]


# -- completion ----------------------------------------------------------------------------
def test_a_saga_requests_each_step_in_order_and_completes() -> None:
    saga = saga_of(step("s0"), step("s1"), step("s2"))
    scenario = SagaScenario(saga)
    first = scenario.when("JobRequested", {"job_id": KEY})
    assert of(first) == [("Do", "s0", 1)]
    assert of(answer(scenario, "Done")) == [("Do", "s1", 1)]
    assert of(answer(scenario, "Done")) == [("Do", "s2", 1)]
    assert answer(scenario, "Done") == []
    state = scenario.state(KEY)
    assert state.status == COMPLETED and not state.open
    assert state.applied == ("s0", "s1", "s2") and state.compensated == ()
    assert scenario.timeline(KEY)[0] == "SagaStarted" and scenario.timeline(KEY)[-1] == "SagaCompleted"
    assert scenario.timeline(KEY).count("SagaStepSucceeded") == 3
    assert of(scenario.commands_of(KEY)) == [("Do", "s0", 1), ("Do", "s1", 1), ("Do", "s2", 1)]


def test_an_action_sees_the_start_event_and_the_replies_of_the_steps_before_it() -> None:
    scenario = started(saga_of(step("s0"), step("s1")), model="m-7")
    answer(scenario, "Done", snapshot_id="snap-1")
    action = scenario.commands_of(KEY)[-1]
    assert action.data["start"]["model"] == "m-7"
    assert action.data["replies"]["s0"]["snapshot_id"] == "snap-1"


def test_a_reply_for_a_saga_that_never_started_and_an_unrelated_event_decide_nothing() -> None:
    scenario = SagaScenario(saga_of(step("s0")))
    assert scenario.when("Done", {"job_id": "nobody"}) == []
    assert scenario.when("SomethingElse", {"job_id": "nobody"}) == []
    assert scenario.when("JobRequested", {"other": "x"}) == []  # no correlation value
    assert scenario.keys() == []
    with pytest.raises(NotFound):
        scenario.state("nobody")


# -- business failure ----------------------------------------------------------------------
def test_a_business_failure_compensates_the_applied_steps_in_reverse_order() -> None:
    scenario = started(saga_of(step("s0"), step("s1"), step("s2"), step("s3")))
    answer(scenario, "Done")
    answer(scenario, "Done")
    assert of(answer(scenario, "Failed", reason="out of stock")) == [("Undo", "s1", 1)]
    state = scenario.state(KEY)
    assert state.reason == "out of stock"
    assert state.status == "compensating"
    assert of(answer(scenario, "Undone")) == [("Undo", "s0", 1)]
    assert answer(scenario, "Undone") == []
    state = scenario.state(KEY)
    assert state.status == COMPENSATED
    assert state.compensated == ("s1", "s0") == tuple(reversed(state.applied))
    assert [d["step"] for d in done(scenario)] == ["s1", "s0"]
    assert not any(d["noop"] for d in done(scenario))
    assert scenario.timeline(KEY)[-1] == "SagaCompensated"
    failed = [t for t in scenario.transitions(KEY) if t.type == "SagaStepFailed"]
    assert [(t.data["step"], t.data["transient"], t.data["reason"]) for t in failed] == [("s2", False, "out of stock")]


def test_a_failure_reply_without_a_reason_is_recorded_under_its_type() -> None:
    scenario = started(saga_of(step("s0")))
    answer(scenario, "Failed")
    assert scenario.state(KEY).status == COMPENSATED  # nothing was applied: nothing to undo
    failed = [t for t in scenario.transitions(KEY) if t.type == "SagaStepFailed"]
    assert failed[0].data["reason"] == "Failed"
    assert scenario.state(KEY).compensated == ()


def test_a_step_without_compensation_is_compensated_at_once_as_a_no_op() -> None:
    scenario = started(saga_of(step("s0"), step("s1", compensable=False), step("s2")))
    answer(scenario, "Done")
    answer(scenario, "Done")
    assert of(answer(scenario, "Failed")) == [("Undo", "s0", 1)]  # none for s1
    assert [(d["step"], d["noop"]) for d in done(scenario)] == [("s1", True)]
    answer(scenario, "Undone")
    state = scenario.state(KEY)
    assert state.status == COMPENSATED
    assert state.compensated == ("s1", "s0")
    assert [(d["step"], d["noop"]) for d in done(scenario)] == [("s1", True), ("s0", False)]
    assert all(c.type != "Undo" or c.data["step"] != "s1" for c in scenario.commands_of(KEY))


def test_a_saga_of_steps_without_compensation_is_compensated_in_the_same_decision() -> None:
    scenario = started(saga_of(step("s0", compensable=False), step("s1", compensable=False), step("s2")))
    answer(scenario, "Done")
    answer(scenario, "Done")
    assert answer(scenario, "Failed") == []
    assert scenario.state(KEY).status == COMPENSATED
    assert [(d["step"], d["noop"]) for d in done(scenario)] == [("s1", True), ("s0", True)]


# -- transient failures --------------------------------------------------------------------
def test_a_transient_failure_is_retried_after_the_backoff_then_compensates_when_exhausted() -> None:
    retry = Retry(attempts=3, base=timedelta(seconds=10), cap=timedelta(seconds=15))
    saga = saga_of(step("s0"), step("s1", retry=retry))
    scenario = started(saga)
    answer(scenario, "Done")
    saga_id = scenario.state(KEY).saga_id
    for attempt in range(2, retry.attempts + 1):
        assert answer(scenario, "Flaky", reason="busy") == []
        wait = retry.delay(saga_id, "s1", attempt)
        scheduled = [t for t in scenario.transitions(KEY) if t.type == "SagaRetryScheduled"][-1]
        assert scheduled.data["due_at"] == (scenario.now + wait).isoformat()
        assert scheduled.data["attempt"] == attempt
        assert scenario.state(KEY).status == RUNNING and scenario.state(KEY).timer is not None
        assert scenario.advance(wait - US) == []
        assert of(scenario.advance(US)) == [("Do", "s1", attempt)]
        assert scenario.state(KEY).attempt == attempt
    assert of(answer(scenario, "Flaky", reason="busy")) == [("Undo", "s0", 1)]  # exhausted: compensate
    actions = [c for c in scenario.commands_of(KEY) if c.type == "Do" and c.data["step"] == "s1"]
    assert len(actions) == retry.attempts
    answer(scenario, "Undone")
    assert scenario.state(KEY).status == COMPENSATED
    assert scenario.state(KEY).compensated == ("s0",)


def test_a_transient_failure_that_then_succeeds_continues_the_saga() -> None:
    retry = Retry(attempts=2, base=timedelta(seconds=1), cap=timedelta(seconds=1))
    scenario = started(saga_of(step("s0", retry=retry), step("s1")))
    answer(scenario, "Flaky")
    assert of(scenario.advance(retry.cap)) == [("Do", "s0", 2)]
    assert of(answer(scenario, "Done")) == [("Do", "s1", 1)]
    assert scenario.state(KEY).applied == ("s0",)


def test_an_exhausted_step_declared_park_parks_instead_of_compensating() -> None:
    retry = Retry(attempts=2, base=timedelta(seconds=1), cap=timedelta(seconds=2))
    scenario = started(saga_of(step("s0"), step("erase", retry=retry, exhausted="park")))
    answer(scenario, "Done")
    answer(scenario, "Flaky")
    assert of(scenario.advance(retry.cap)) == [("Do", "erase", 2)]
    assert answer(scenario, "Flaky", reason="disk full") == []
    state = scenario.state(KEY)
    assert state.status == PARKED and state.open
    assert state.step == "erase" and state.phase == ACTION
    assert state.reason is not None and "'erase'" in state.reason and "disk full" in state.reason
    assert all(c.type != "Undo" for c in scenario.commands_of(KEY))
    assert scenario.advance(timedelta(days=1)) == []
    assert answer(scenario, "Undone", command_id=None) == []
    assert answer(scenario, "Done", command_id=None) == []
    assert scenario.state(KEY) == state


# -- deadlines -----------------------------------------------------------------------------
def test_an_expired_deadline_compensates_the_timed_out_step_too() -> None:
    deadline = timedelta(seconds=30)
    scenario = started(saga_of(step("s0"), step("s1", deadline=deadline), step("s2")))
    answer(scenario, "Done")
    action_id = requested(scenario, "s1")[-1].data["command_id"]
    assert scenario.advance(deadline - US) == []
    assert scenario.state(KEY).awaiting
    compensations = scenario.advance(US)
    assert of(compensations) == [("Undo", "s1", 1)]  # its outcome is unknown: undone first
    assert compensations[0].data["action_command_id"] == action_id  # to tell whether it ever took effect
    state = scenario.state(KEY)
    assert state.unknown == ("s1",) and state.applied == ("s0", "s1")
    assert state.reason is not None and "'s1'" in state.reason
    assert "SagaDeadlineFired" in scenario.timeline(KEY)
    assert answer(scenario, "Done", command_id=action_id) == []  # the late answer changes nothing
    assert of(answer(scenario, "Undone")) == [("Undo", "s0", 1)]
    answer(scenario, "Undone")
    assert scenario.state(KEY).status == COMPENSATED
    assert scenario.state(KEY).compensated == ("s1", "s0")


def test_a_reply_before_the_deadline_disarms_it() -> None:
    deadline = timedelta(seconds=30)
    scenario = started(saga_of(step("s0", deadline=deadline), step("s1")))
    timer = scenario.state(KEY).timer
    assert timer is not None and timer.due_at == (scenario.now + deadline).isoformat()
    answer(scenario, "Done")
    assert scenario.advance(deadline * 10) == []
    assert scenario.state(KEY).status == RUNNING and scenario.state(KEY).step == "s1"
    assert "SagaDeadlineFired" not in scenario.timeline(KEY)


def test_a_compensation_that_times_out_is_retried_then_parks() -> None:
    deadline = timedelta(seconds=5)
    compensation_retry = Retry(attempts=2, base=timedelta(seconds=1), cap=timedelta(seconds=1))
    scenario = started(saga_of(step("s0", deadline=deadline), step("s1"), compensation_retry=compensation_retry))
    answer(scenario, "Done")
    answer(scenario, "Failed")
    scenario.advance(timedelta(hours=1))
    state = scenario.state(KEY)
    assert state.status == PARKED and state.phase == COMPENSATION and state.step == "s0"
    undo = [c for c in scenario.commands_of(KEY) if c.type == "Undo"]
    assert len(undo) == compensation_retry.attempts
    assert scenario.timeline(KEY).count("SagaDeadlineFired") == compensation_retry.attempts
    assert "SagaCompensated" not in scenario.timeline(KEY)


# -- failing compensations -----------------------------------------------------------------
def test_a_failing_compensation_is_retried_with_compensation_retry_then_parked() -> None:
    compensation_retry = Retry(attempts=3, base=timedelta(seconds=2), cap=timedelta(seconds=3))
    scenario = started(saga_of(step("s0"), step("s1"), compensation_retry=compensation_retry))
    answer(scenario, "Done")
    answer(scenario, "Failed")
    saga_id = scenario.state(KEY).saga_id
    for attempt in range(2, compensation_retry.attempts + 1):
        assert answer(scenario, "UndoFailed", reason="locked") == []
        wait = compensation_retry.delay(saga_id, "s0", attempt)
        assert scenario.advance(wait - US) == []
        assert of(scenario.advance(US)) == [("Undo", "s0", attempt)]
    assert answer(scenario, "UndoFailed", reason="locked") == []
    state = scenario.state(KEY)
    assert state.status == PARKED and state.phase == COMPENSATION
    assert state.reason is not None and "'s0'" in state.reason and "locked" in state.reason
    assert len([c for c in scenario.commands_of(KEY) if c.type == "Undo"]) == compensation_retry.attempts
    # parked is never reported as compensated, whatever arrives later
    assert scenario.advance(timedelta(days=30)) == []
    assert answer(scenario, "Undone", command_id=None) == []
    assert scenario.state(KEY).status == PARKED
    assert "SagaCompensated" not in scenario.timeline(KEY)


# -- late, duplicate and foreign replies ---------------------------------------------------
def test_late_and_duplicate_replies_decide_nothing() -> None:
    retry = Retry(attempts=3, base=timedelta(seconds=5), cap=timedelta(seconds=5))
    scenario = started(saga_of(step("s0"), step("s1", retry=retry)))
    first = scenario.state(KEY).command_id
    answer(scenario, "Done")
    before = snapshot(scenario)
    assert answer(scenario, "Done", command_id=first) == []  # the duplicate answer to s0
    assert answer(scenario, "Failed", command_id=first) == []
    assert answer(scenario, "Undone") == []  # a compensation reply while the action is in flight
    assert snapshot(scenario) == before
    answer(scenario, "Flaky")  # s1 now waits for its retry: nothing is awaited
    before = snapshot(scenario)
    assert answer(scenario, "Done") == [] and answer(scenario, "Done", command_id=None) == []
    assert snapshot(scenario) == before
    scenario.advance(retry.cap)
    answer(scenario, "Done")
    assert scenario.state(KEY).status == COMPLETED
    before = snapshot(scenario)
    assert answer(scenario, "Done", command_id=None) == [] and answer(scenario, "Failed", command_id=None) == []
    assert scenario.advance(timedelta(days=1)) == []
    assert snapshot(scenario) == before


def test_a_reply_naming_another_command_is_ignored() -> None:
    scenario = started(saga_of(step("s0"), step("s1")))
    before = snapshot(scenario)
    assert answer(scenario, "Done", command_id=str(uuid.uuid4())) == []
    assert answer(scenario, "Failed", command_id=str(uuid.uuid4())) == []
    assert snapshot(scenario) == before
    assert of(answer(scenario, "Done")) == [("Do", "s1", 1)]


def test_an_answer_to_an_earlier_attempt_is_not_taken_for_the_current_one() -> None:
    retry = Retry(attempts=3, base=timedelta(seconds=1), cap=timedelta(seconds=1))
    scenario = started(saga_of(step("s0", retry=retry)))
    earlier = scenario.state(KEY).command_id
    answer(scenario, "Flaky")
    scenario.advance(retry.cap)
    assert scenario.state(KEY).attempt == 2 and scenario.state(KEY).command_id != earlier
    before = snapshot(scenario)
    assert answer(scenario, "Done", command_id=earlier) == []
    assert answer(scenario, "Failed", command_id=earlier) == []
    assert snapshot(scenario) == before
    answer(scenario, "Done")
    assert scenario.state(KEY).status == COMPLETED


def test_a_thousand_duplicate_starts_make_one_instance_and_one_command() -> None:
    scenario = SagaScenario(saga_of(step("s0"), step("s1")))
    caused = [scenario.when("JobRequested", {"job_id": KEY}) for _ in range(1000)]
    assert [len(c) for c in caused] == [1] + [0] * 999
    assert scenario.keys() == [KEY]
    assert len(scenario.commands_of(KEY)) == 1
    assert scenario.timeline(KEY) == ["SagaStarted", "SagaStepRequested"]
    scenario.when("JobRequested", {"job_id": "j2"})
    assert scenario.keys() == [KEY, "j2"]


# -- builders that raise -------------------------------------------------------------------
def test_an_action_builder_that_raises_parks_the_saga_with_the_error() -> None:
    scenario = started(saga_of(step("s0"), step("s1", action=build("s1", ACTION, raising={1}))))
    assert answer(scenario, "Done") == []
    state = scenario.state(KEY)
    assert state.status == PARKED and state.step == "s1" and state.phase == ACTION
    assert state.reason is not None
    assert "'s1'" in state.reason and "Boom" in state.reason and "cannot build s1 attempt 1" in state.reason
    assert of(scenario.commands_of(KEY)) == [("Do", "s0", 1)]


def test_a_builder_returning_something_else_than_a_command_parks_the_saga() -> None:
    def wrong(ctx: SagaContext) -> Command:
        return {"type": "Do"}  # type: ignore[return-value]
    scenario = started(saga_of(step("s0", action=wrong)))
    state = scenario.state(KEY)
    assert state.status == PARKED and state.reason is not None and "TypeError" in state.reason
    assert scenario.commands_of(KEY) == []


def test_a_compensation_builder_that_raises_parks_the_saga_in_compensation() -> None:
    scenario = started(saga_of(step("s0", compensation=build("s0", COMPENSATION, raising={1})), step("s1")))
    answer(scenario, "Done")
    assert answer(scenario, "Failed") == []
    state = scenario.state(KEY)
    assert state.status == PARKED and state.phase == COMPENSATION and state.step == "s0"
    assert state.reason is not None and "Boom" in state.reason and "'s0'" in state.reason
    assert "SagaCompensated" not in scenario.timeline(KEY)
    # the operator fixes the cause and resumes: the compensation is built again, as attempt 2
    assert of(scenario.operator(KEY, RESUME, "builder fixed", actor="ana")) == [("Undo", "s0", 2)]
    answer(scenario, "Undone")
    assert scenario.state(KEY).status == COMPENSATED


# -- operator actions ----------------------------------------------------------------------
def operator_transitions(scenario: SagaScenario, before: int) -> list[Transition]:
    return scenario.transitions(KEY)[before:]


def test_resume_applies_to_a_parked_saga_only_and_requests_the_next_attempt() -> None:
    retry = Retry(attempts=2, base=timedelta(seconds=1), cap=timedelta(seconds=1))
    scenario = started(saga_of(step("s0", retry=retry, exhausted="park"), step("s1")))
    with pytest.raises(SagaRefused) as err:
        scenario.operator(KEY, RESUME, "try again")
    assert "parked" in str(err.value)
    answer(scenario, "Flaky")
    scenario.advance(retry.cap)
    answer(scenario, "Flaky")
    parked = scenario.state(KEY)
    assert parked.status == PARKED
    count = len(scenario.transitions(KEY))
    assert of(scenario.operator(KEY, RESUME, "the disk was replaced", actor="ana")) == [("Do", "s0", parked.attempt + 1)]
    new = operator_transitions(scenario, count)
    assert new[0].type == "SagaOperatorAction"
    assert new[0].actor == "ana"
    assert new[0].data["reason"] == "the disk was replaced" and new[0].data["action"] == RESUME
    assert [t.type for t in new[1:]] == ["SagaStepRequested"]
    assert scenario.state(KEY).status == RUNNING
    assert of(answer(scenario, "Done")) == [("Do", "s1", 1)]


def test_retry_step_names_the_step_in_flight_and_requests_the_next_attempt() -> None:
    scenario = started(saga_of(step("s0"), step("s1")))
    answer(scenario, "Done")
    old = scenario.state(KEY).command_id
    before = snapshot(scenario)
    with pytest.raises(SagaRefused) as err:
        scenario.operator(KEY, RETRY_STEP, "stuck", step="s0")
    assert "'s0'" in str(err.value) and "'s1'" in str(err.value)
    assert snapshot(scenario) == before
    count = len(scenario.transitions(KEY))
    assert of(scenario.operator(KEY, RETRY_STEP, "stuck", actor="bo", step="s1")) == [("Do", "s1", 2)]
    new = operator_transitions(scenario, count)
    assert new[0].type == "SagaOperatorAction" and new[0].actor == "bo" and new[0].data["reason"] == "stuck"
    assert new[0].data["action"] == RETRY_STEP and new[0].data["step"] == "s1"
    assert scenario.state(KEY).command_id != old
    assert answer(scenario, "Done", command_id=old) == []  # the first attempt's answer is no longer awaited
    answer(scenario, "Done")
    assert scenario.state(KEY).status == COMPLETED


def test_mark_compensated_records_the_parked_step_and_compensates_the_rest() -> None:
    compensation_retry = Retry(attempts=1)
    scenario = started(saga_of(step("s0"), step("s1"), step("s2"), compensation_retry=compensation_retry))
    answer(scenario, "Done")
    answer(scenario, "Done")
    answer(scenario, "Failed")
    answer(scenario, "UndoFailed", reason="manual cleanup needed")
    assert scenario.state(KEY).status == PARKED and scenario.state(KEY).step == "s1"
    count = len(scenario.transitions(KEY))
    caused = scenario.operator(KEY, MARK_COMPENSATED, "cleaned up by hand", actor="cy")
    assert of(caused) == [("Undo", "s0", 1)]
    new = operator_transitions(scenario, count)
    assert [t.type for t in new] == ["SagaOperatorAction", "SagaCompensationDone", "SagaCompensationRequested"]
    assert new[0].actor == "cy" and new[0].data["reason"] == "cleaned up by hand"
    assert new[1].data["step"] == "s1"
    answer(scenario, "Undone")
    state = scenario.state(KEY)
    assert state.status == COMPENSATED and state.compensated == ("s1", "s0")


def test_mark_compensated_of_the_last_step_to_undo_finishes_the_saga() -> None:
    scenario = started(saga_of(step("s0"), step("s1"), compensation_retry=Retry(attempts=1)))
    answer(scenario, "Done")
    answer(scenario, "Failed")
    answer(scenario, "UndoFailed")
    assert scenario.operator(KEY, MARK_COMPENSATED, "done by hand") == []
    assert scenario.state(KEY).status == COMPENSATED
    assert scenario.timeline(KEY)[-3:] == ["SagaOperatorAction", "SagaCompensationDone", "SagaCompensated"]


@pytest.mark.parametrize("action", [RESUME, RETRY_STEP, MARK_COMPENSATED])
def test_operator_actions_on_a_finished_saga_are_refused_and_change_nothing(action: str) -> None:
    scenario = started(saga_of(step("s0")))
    answer(scenario, "Done")
    before = snapshot(scenario)
    with pytest.raises(SagaRefused) as err:
        scenario.operator(KEY, action, "why not")
    assert COMPLETED in str(err.value)
    assert snapshot(scenario) == before


@pytest.mark.parametrize("reason", ["", "   "])
@pytest.mark.parametrize("action", [RESUME, RETRY_STEP, MARK_COMPENSATED])
def test_operator_actions_without_a_reason_are_refused_and_change_nothing(action: str, reason: str) -> None:
    scenario = started(saga_of(step("s0", action=build("s0", ACTION, raising={1}))))
    assert scenario.state(KEY).status == PARKED  # every action would apply, but for the reason
    before = snapshot(scenario)
    with pytest.raises(SagaRefused) as err:
        scenario.operator(KEY, action, reason)
    assert "reason" in str(err.value)
    assert snapshot(scenario) == before


def test_operator_actions_in_the_wrong_state_are_refused_and_change_nothing() -> None:
    scenario = started(saga_of(step("s0"), step("s1")))
    before = snapshot(scenario)
    for action, step_name in ((RESUME, None), (MARK_COMPENSATED, None), (RETRY_STEP, "s1"), ("reboot", None)):
        with pytest.raises(SagaRefused):
            scenario.operator(KEY, action, "because", step=step_name)
        assert snapshot(scenario) == before
    with pytest.raises(NotFound):
        scenario.operator("nobody", RESUME, "because")
