"""The pure saga state machine: decide, evolve, fold and input_for, and invariants over random sagas.

Pure tests: no services. The random sagas are Saga subclasses built at run time (as the
jobs example does), driven by random replies, clock advances and operator actions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import event, given, settings, strategies as st

from projections.sagas.declaration import (
    ACTION, COMPENSATION, Builder, Command, Retry, Saga, SagaContext, Step, command_id,
)
from projections.sagas.machine import (
    COMPENSATED, COMPENSATING, COMPENSATION_DONE, COMPENSATION_REQUESTED, COMPLETED, DEADLINE, MARK_COMPENSATED,
    OPERATOR_ACTION, OPERATOR_ACTIONS, PARKED, RESUME, RETRY, RETRY_SCHEDULED, RETRY_STEP, RUNNING, SAGA_COMPENSATED,
    SAGA_PARKED, STARTED, STATES, STEP_REQUESTED, TERMINAL, TRANSITIONS, Decision, Fired, Input, IssuedCommand,
    Operator, Reply, SagaRefused, SagaState, Timer, Transition, Trigger, decide, evolve, fold, input_for,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
REPLY_TYPES = ("Done", "Failed", "Flaky", "Undone", "UndoFailed")


# -- sagas built at run time -----------------------------------------------------------------
@dataclass(frozen=True)
class StepSpec:
    compensable: bool
    attempts: int
    deadline_s: int | None
    exhausted: str
    raising: frozenset[tuple[str, int]]  #: (phase, attempt) on which the builder raises


def build(name: str, phase: str, raising: frozenset[tuple[str, int]]) -> Builder:
    def make(ctx: SagaContext) -> Command:
        if (phase, ctx.attempt) in raising:
            raise RuntimeError(f"no {phase} for {name} at attempt {ctx.attempt}")
        return Command("Do" if phase == ACTION else "Undo",
                       {"job_id": ctx.key, "step": name, "attempt": ctx.attempt, "action_command_id": ctx.command_id})
    return make


def saga_of(specs: Sequence[StepSpec], compensation_attempts: int = 2) -> Saga:
    """A saga of ``len(specs)`` steps s0, s1, ... sharing their reply types (as the jobs example does)."""

    class Job(Saga):
        name = f"job{len(specs)}"
        starts_on = "JobRequested"
        correlation = "job_id"
        subject = "person"

    Job.compensation_retry = Retry(attempts=compensation_attempts, base=timedelta(seconds=1), cap=timedelta(seconds=4))
    Job.steps = tuple(
        Step(f"s{i}", action=build(f"s{i}", ACTION, spec.raising),
             compensation=build(f"s{i}", COMPENSATION, spec.raising) if spec.compensable else None,
             succeeded_on=("Done",), failed_on=("Failed",), transient_on=("Flaky",),
             compensated_on=("Undone",) if spec.compensable else (),
             compensation_failed_on=("UndoFailed",) if spec.compensable else (),
             retry=Retry(attempts=spec.attempts, base=timedelta(seconds=1), cap=timedelta(seconds=4)),
             deadline=None if spec.deadline_s is None else timedelta(seconds=spec.deadline_s),
             exhausted=spec.exhausted)
        for i, spec in enumerate(specs))
    Job.__name__ = Job.__qualname__ = f"Job{len(specs)}"
    return Job()


def plain(n: int, **changes: Any) -> Saga:
    spec = StepSpec(compensable=True, attempts=1, deadline_s=None, exhausted="compensate", raising=frozenset())
    specs = [StepSpec(**{**spec.__dict__, **changes}) for _ in range(n)]
    return saga_of(specs)


# -- a driver over decide, keeping what the coordinator would append -----------------------
@dataclass
class Run:
    saga: Saga
    key: str = "j1"
    now: datetime = NOW
    state: SagaState | None = None
    log: list[tuple[Transition, str]] = field(default_factory=list)
    issued: list[IssuedCommand] = field(default_factory=list)
    data: dict[str, Mapping[str, Any]] = field(default_factory=dict)  #: event id -> data
    #: (input, decision, state before) of every input, refused operator actions excluded
    history: list[tuple[Input, Decision, SagaState | None]] = field(default_factory=list)

    def context(self, state: SagaState, step: str, attempt: int, action_command: str | None) -> SagaContext:
        replies = {name: self.data.get(reply_id, {}) for name, reply_id in state.replies.items()}
        return SagaContext(state.saga_id, state.key, self.data.get(state.trigger_event_id, {}), replies, step, attempt,
                           action_command)

    def feed(self, received: Input) -> Decision:
        before = self.state
        decision = decide(self.saga, before, received, self.now, self.context)
        # decide is a function of its arguments: a retried decision names the same events
        assert decide(self.saga, before, received, self.now, self.context) == decision
        assert self.state == before
        self.log += [(t, self.now.isoformat()) for t in decision.transitions]
        self.issued += decision.commands
        self.history.append((received, decision, before))
        if decision.state is not None:
            self.state = decision.state
        return decision

    def event(self, event_type: str, data: Mapping[str, Any]) -> Decision | None:
        event_id = str(uuid.uuid4())
        self.data[event_id] = data
        found = input_for(self.saga, event_type, event_id, data)
        if found is None:
            return None
        key, received = found
        assert key == self.key
        return self.feed(received)

    def start(self) -> Decision | None:
        return self.event("JobRequested", {"job_id": self.key, "person": "p-1"})

    def reply(self, reply_type: str, command: str | None, **data: Any) -> Decision | None:
        body: dict[str, Any] = {"job_id": self.key, **data}
        if command is not None:
            body["command_id"] = command
        return self.event(reply_type, body)

    def advance(self, by: timedelta) -> None:
        target = self.now + by
        while self.state is not None and self.state.timer is not None \
                and datetime.fromisoformat(self.state.timer.due_at) <= target:
            self.now = max(self.now, datetime.fromisoformat(self.state.timer.due_at))
            self.feed(Fired(self.state.timer))
        self.now = target

    def operator(self, action: str, reason: str, step: str | None = None, actor: str = "ops") -> Decision:
        """An operator acts; SagaRefused (and nothing recorded) when the action does not apply."""
        before, received = self.state, Operator(action, actor, reason, step)
        assert before is not None
        decision = decide(self.saga, before, received, self.now, self.context)
        self.state = decision.state
        self.log += [(t, self.now.isoformat()) for t in decision.transitions]
        self.issued += decision.commands
        self.history.append((received, decision, before))
        return decision

    @property
    def current(self) -> SagaState:
        assert self.state is not None
        return self.state

    def types(self) -> list[str]:
        return [t.type for t, _ in self.log]


# -- decide, one input at a time -----------------------------------------------------------
def test_a_start_records_the_instance_and_requests_the_first_step_under_its_command_id() -> None:
    run = Run(plain(2))
    decision = run.start()
    assert decision is not None and decision.state is not None
    state = decision.state
    assert [t.type for t in decision.transitions] == [STARTED, STEP_REQUESTED]
    assert state.saga_id == run.saga.saga_id("j1") and state.key == "j1" and state.subject == "p-1"
    assert state.definition_version == run.saga.version and state.saga == run.saga.name
    assert state.status == RUNNING and state.step == "s0" and state.phase == ACTION and state.attempt == 1
    assert state.awaiting
    [issued] = decision.commands
    assert issued.event_id == str(command_id(state.saga_id, "s0", 1, ACTION))
    assert state.command_id == issued.event_id == decision.transitions[1].data["command_id"]
    assert issued.command.type == "Do" and issued.command.data["step"] == "s0"
    assert decision.transitions[0].data["trigger_event_id"] == state.trigger_event_id


def test_the_saga_id_can_be_given_and_a_second_start_decides_nothing() -> None:
    saga = plain(1)
    trigger = Trigger("e1", "JobRequested", "j1")
    decision = decide(saga, None, trigger, NOW, Run(saga).context, saga_id="saga-custom")
    assert decision.state is not None and decision.state.saga_id == "saga-custom"
    assert decision.commands[0].event_id == str(command_id("saga-custom", "s0", 1, ACTION))
    again = decide(saga, decision.state, Trigger("e2", "JobRequested", "j1"), NOW, Run(saga).context)
    assert again.empty and again.commands == () and again.state == decision.state


@pytest.mark.parametrize("received", [
    Reply("r1", "Done", {"job_id": "j1"}),
    Fired(Timer(DEADLINE, "s0", ACTION, 1, NOW.isoformat())),
    Operator(RESUME, "ops", "why"),
])
def test_inputs_for_an_instance_that_does_not_exist_decide_nothing(received: Input) -> None:
    saga = plain(1)
    decision = decide(saga, None, received, NOW, Run(saga).context)
    assert decision.empty and decision.state is None and decision.commands == ()


def test_a_timer_that_no_longer_matches_the_step_in_flight_decides_nothing() -> None:
    run = Run(plain(2, deadline_s=10))
    run.start()
    armed = run.current.timer
    assert armed is not None and armed.kind == DEADLINE
    run.reply("Done", run.current.command_id)
    before = run.current
    stale = run.feed(Fired(armed))
    assert stale.empty and stale.state == before


def test_evolve_refuses_a_transition_before_the_start_and_an_unknown_one() -> None:
    with pytest.raises(Exception, match="before SagaStarted"):
        evolve(None, Transition(STEP_REQUESTED, {"step": "s0", "command_id": "c"}), NOW.isoformat())
    run = Run(plain(1))
    run.start()
    with pytest.raises(Exception, match="unknown saga transition"):
        evolve(run.current, Transition("SagaDanced", {}), NOW.isoformat())
    assert fold([]) is None


def test_input_for_tells_starts_replies_and_ignored_events_apart() -> None:
    saga = plain(2)
    start = input_for(saga, "shop.JobRequested", "e1", {"job_id": "j1", "person": "p-9"})
    assert start == ("j1", Trigger("e1", "shop.JobRequested", "j1", "p-9"))
    assert input_for(saga, "JobRequested", "e1", {"job_id": "j1", "person": 7}) == ("j1", Trigger("e1", "JobRequested",
                                                                                                    "j1", None))
    reply = input_for(saga, "shop.Done", "e2", {"job_id": "j1", "x": 1})
    assert reply == ("j1", Reply("e2", "shop.Done", {"job_id": "j1", "x": 1}))
    assert input_for(saga, "Unrelated", "e3", {"job_id": "j1"}) is None
    assert input_for(saga, "Done", "e4", {"other": "j1"}) is None
    assert input_for(saga, "Done", "e4", {"job_id": ""}) is None
    for own in TRANSITIONS:
        assert input_for(saga, f"evp.platform.{own}", "e5", {"job_id": "j1"}) is None


def test_a_state_survives_its_json_row() -> None:
    run = Run(plain(3, deadline_s=5))
    run.start()
    run.reply("Done", run.current.command_id)
    run.advance(timedelta(seconds=5))
    state = run.current
    assert state.timer is not None and state.unknown == ("s1",)
    assert SagaState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_compensations_carry_the_action_command_of_their_step() -> None:
    run = Run(plain(3, attempts=2))
    run.start()
    run.reply("Done", run.current.command_id)
    run.reply("Flaky", run.current.command_id)
    run.advance(timedelta(seconds=10))
    s1_action = run.current.command_id  # attempt 2 of s1
    run.reply("Done", s1_action)
    run.reply("Failed", run.current.command_id)
    undo = [c for c in run.issued if c.phase == COMPENSATION]
    assert [c.step for c in undo] == ["s1"]
    assert undo[0].command.data["action_command_id"] == s1_action == str(command_id(run.current.saga_id, "s1", 2,
                                                                                    ACTION))
    assert run.log[-1][0].type == COMPENSATION_REQUESTED
    assert run.log[-1][0].data["action_command_id"] == s1_action


def test_mark_compensated_while_a_step_is_in_flight_is_refused() -> None:
    run = Run(plain(2))
    run.start()
    before = run.current
    with pytest.raises(SagaRefused, match="'s0'"):
        run.operator(MARK_COMPENSATED, "give up")
    assert run.current == before


# -- random sagas: invariants and event sourcing --------------------------------------------
specs = st.builds(
    StepSpec, compensable=st.booleans(), attempts=st.integers(1, 3),
    deadline_s=st.none() | st.integers(1, 90), exhausted=st.sampled_from(["compensate", "park"]),
    raising=st.frozensets(st.tuples(st.sampled_from([ACTION, COMPENSATION]), st.integers(1, 2)), max_size=1)
    | st.just(frozenset()))

replies = st.tuples(st.just("reply"),
                    st.sampled_from(("Done", "Done", "Done", "Failed", "Flaky", "Undone", "Undone", "UndoFailed")),
                    st.sampled_from(("current", "current", "current", "none", "stale", "bogus")),
                    st.integers(0, 20))
advances = st.tuples(st.just("advance"), st.integers(0, 150))
operators = st.tuples(st.just("operator"), st.sampled_from((*OPERATOR_ACTIONS, "reboot")),
                      st.none() | st.integers(0, 5), st.sampled_from(("fixed it", "fixed it", "fixed it", "", " ")))
starts = st.tuples(st.just("start"))
moves = st.lists(st.one_of(replies, replies, replies, advances, operators, starts), min_size=5, max_size=40)


def play(run: Run, move: tuple[Any, ...]) -> None:
    """One random move; a refused operator action must change nothing."""
    kind = move[0]
    if kind == "reply":
        _, reply_type, mode, pick = move
        state = run.current
        command = {"current": state.command_id, "none": None, "bogus": str(uuid.uuid4()),
                   "stale": run.issued[pick % len(run.issued)].event_id if run.issued else None}[mode]
        before = state
        decision = run.reply(reply_type, command, reason="planned" if pick % 2 else None)
        if decision is None:  # a type no step of this saga declares
            assert reply_type not in run.saga.replies()
            return
        if isinstance(command, str) and command != before.command_id:
            assert decision.empty and decision.commands == () and run.current == before  # it answers another command
        if not before.awaiting or before.status in TERMINAL or before.status == PARKED:
            assert decision.empty and run.current == before  # nothing was awaited: a late reply
    elif kind == "advance":
        run.advance(timedelta(seconds=move[1]))
    elif kind == "start":
        before = run.current
        decision = run.start()
        assert decision is not None and decision.empty and run.current == before
    else:
        _, action, index, reason = move
        names = [s.name for s in run.saga.steps]
        step = names[index] if index is not None and index < len(names) else None
        before, log, issued = run.current, len(run.log), len(run.issued)
        try:
            decision = run.operator(action, reason, step)
        except SagaRefused:
            assert run.current == before and len(run.log) == log and len(run.issued) == issued
            refused = (before.status in TERMINAL or not reason.strip() or action not in OPERATOR_ACTIONS
                       or (action == RESUME and before.status != PARKED)
                       or (action == RETRY_STEP and step not in (None, before.step))
                       or (action == MARK_COMPENSATED and before.status == RUNNING and before.phase == ACTION
                           and before.awaiting))
            assert refused, f"{action} refused on {before}"
            return
        assert before.status not in TERMINAL and reason.strip()
        first = decision.transitions[0]
        assert first.type == OPERATOR_ACTION and first.actor == "ops" and first.data["reason"] == reason
        assert first.data["action"] == action
        if action == RESUME:
            assert before.status == PARKED
        if action in (RESUME, RETRY_STEP):
            requested = [t for t in decision.transitions if t.type in (STEP_REQUESTED, COMPENSATION_REQUESTED)]
            assert not requested or requested[0].data["attempt"] == before.attempt + 1


def check(run: Run, prior: SagaState) -> None:
    """The invariants that hold after every input."""
    saga, state = run.saga, run.current
    names = tuple(s.name for s in saga.steps)
    assert state.status in STATES
    if prior.status in TERMINAL:
        assert state == prior  # a finished saga never changes
    # the state is the fold of its transitions, and survives its JSON row
    assert fold(run.log) == state
    assert SagaState.from_json(json.loads(json.dumps(state.to_json()))) == state
    assert state.version == len(run.log)
    for transition, _ in run.log:
        assert transition.type in TRANSITIONS
        json.dumps(transition.data)
    # applied steps are distinct, in declaration order; compensations undo them in reverse, once each
    assert len(set(state.applied)) == len(state.applied)
    assert list(state.applied) == sorted(state.applied, key=names.index)
    assert set(state.unknown) <= set(state.applied)
    assert len(set(state.compensated)) == len(state.compensated)
    assert state.compensated == tuple(reversed(state.applied))[:len(state.compensated)]
    if state.status == COMPLETED:
        assert state.applied == names and state.compensated == () and state.unknown == ()
    if state.status == COMPENSATED:
        assert state.compensated == tuple(reversed(state.applied))
        assert [t.data["step"] for t, _ in run.log if t.type == COMPENSATION_DONE] == list(state.compensated)
    # an open saga that is not parked always waits for something: a reply or its retry timer
    if state.status in (RUNNING, COMPENSATING):
        assert state.awaiting or (state.timer is not None and state.timer.kind == RETRY), state
        assert (state.status == COMPENSATING) == (state.phase == COMPENSATION)
    if state.awaiting:
        assert state.command_id == run.issued[-1].event_id
        deadline = saga.step(state.step).deadline
        assert (state.timer is not None) == (deadline is not None)
    # every command has its own idempotency key, derived from saga id / step / attempt / kind
    ids = [c.event_id for c in run.issued]
    assert len(set(ids)) == len(ids)
    for c in run.issued:
        assert c.event_id == str(command_id(state.saga_id, c.step, c.attempt, c.phase))
    requested = [t.data["command_id"] for t, _ in run.log if t.type in (STEP_REQUESTED, COMPENSATION_REQUESTED)]
    assert requested == ids
    # parked is never followed by compensated unless an operator acted in between
    types = run.types()
    for i, kind in enumerate(types):
        if kind == SAGA_PARKED:
            following = types[i + 1:]
            if SAGA_COMPENSATED in following:
                assert OPERATOR_ACTION in following[:following.index(SAGA_COMPENSATED)]


def check_history(run: Run) -> None:
    """Invariants over whole decisions."""
    for received, decision, before in run.history:
        automatic = not isinstance(received, Operator)
        for t in decision.transitions:
            if t.type == RETRY_SCHEDULED and automatic:
                step = run.saga.step(str(t.data["step"]))
                policy = step.retry if t.data["phase"] == ACTION else run.saga.compensation_retry
                assert int(t.data["attempt"]) <= policy.attempts  # a retry only while attempts remain
        assert before is not None or isinstance(received, Trigger)
        for c in decision.commands:
            if c.phase == COMPENSATION:  # only what took effect (or may have) is undone
                assert decision.state is not None and c.step in decision.state.applied


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(specs, min_size=1, max_size=6), compensation_attempts=st.integers(1, 3), moves=moves)
def test_random_sagas_keep_their_invariants(steps: list[StepSpec], compensation_attempts: int,
                                            moves: list[tuple[Any, ...]]) -> None:
    run = Run(saga_of(steps, compensation_attempts))
    run.start()
    check(run, run.current)
    for move in moves:
        prior = run.current
        play(run, move)
        check(run, prior)
    check_history(run)
    event(f"ends {run.current.status}")
    event(f"{sum(isinstance(i, Operator) for i, _, _ in run.history)} operator action(s) applied")


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(specs, min_size=1, max_size=6), moves=moves)
def test_the_state_decide_returns_is_the_fold_of_the_transitions(steps: list[StepSpec],
                                                                 moves: list[tuple[Any, ...]]) -> None:
    run = Run(saga_of(steps))
    run.start()
    for move in moves:
        play(run, move)
        states = [d.state for _, d, _ in run.history]
        at = 0
        for _, decision, _ in run.history:
            at += len(decision.transitions)
            assert fold(run.log[:at]) == decision.state
        assert states[-1] == run.current


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(specs.filter(lambda s: not s.raising), min_size=1, max_size=6),
       fail_at=st.integers(0, 5), deadline=st.booleans())
def test_a_failure_anywhere_compensates_exactly_the_steps_before_it_in_reverse(
        steps: list[StepSpec], fail_at: int, deadline: bool) -> None:
    run = Run(saga_of(steps))
    run.start()
    fail_at = min(fail_at, len(steps) - 1)
    for _ in range(fail_at):
        run.reply("Done", run.current.command_id)
    timed_out = deadline and steps[fail_at].deadline_s is not None
    if timed_out:
        run.advance(timedelta(seconds=steps[fail_at].deadline_s or 0))
    else:
        run.reply("Failed", run.current.command_id)
    while run.current.status == COMPENSATING:
        if run.current.awaiting:
            run.reply("Undone", run.current.command_id)
        else:
            run.advance(timedelta(seconds=5))
    expected = tuple(f"s{i}" for i in range(fail_at + (1 if timed_out else 0)))
    assert run.current.status == COMPENSATED
    assert run.current.applied == expected
    assert run.current.compensated == tuple(reversed(expected))
    undo = [c.step for c in run.issued if c.phase == COMPENSATION]
    assert undo == [s for s in reversed(expected) if run.saga.step(s).compensation is not None]
    noop = [t.data["step"] for t, _ in run.log if t.type == COMPENSATION_DONE and t.data["noop"]]
    assert noop == [s for s in reversed(expected) if run.saga.step(s).compensation is None]
