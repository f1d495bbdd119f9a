"""The saga state machine: pure decisions from a state and an input to transitions and commands.

Nothing here touches a database or a broker: the coordinator, the operator commands and the
in-memory test fixture all call :func:`decide` and write what it returns. A saga's state is
the fold of its transitions (:func:`evolve`), so the status row the coordinator keeps can
always be rebuilt from the saga's stream in the ledger.

Contract of :func:`decide` (one input for one instance):

1. a start event for a key without an instance starts one (``SagaStarted``) and requests the
   first step; a start for a key that has one decides nothing (starting is idempotent);
2. a reply is matched against the step in flight only: a reply for another step, another
   phase or an instance that is not waiting decides nothing (a late or repeated reply); a
   reply with a ``command_id`` field must name the command in flight;
3. a step that succeeds requests the next one, or completes the saga;
4. a transient failure is retried after the step's backoff while attempts remain; a
   business failure, an expired deadline or an exhausted retry starts compensation (an
   exhausted retry parks instead when the step is declared ``exhausted="park"``);
5. compensation undoes the applied steps in reverse order of completion — a step whose
   deadline expired counts as applied, its outcome being unknown — and a step without a
   compensation is done at once (a no-op); reaching an ``irreversible`` step parks the saga;
6. a failed or timed-out compensation is retried with the saga's ``compensation_retry``,
   then the saga is **parked** with the reason; parked is never reported as compensated;
   A step's builder that raises, or a command its schema refuses, parks the saga naming the
   error, for an operator to fix and ``resume``;
7. operator actions (resume, retry-step, mark-compensated) are recorded with their actor and
   reason before what they cause; an action that does not apply to the state is refused
   with :class:`SagaRefused` naming why;
8. a timer that no longer matches the step in flight (a reply beat it) decides nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from events.errors import EvpError
from projections.sagas.declaration import ACTION, COMPENSATION, Command, Saga, SagaContext, command_id

# -- states ----------------------------------------------------------------------------------
RUNNING = "running"
COMPENSATING = "compensating"
COMPLETED = "completed"
COMPENSATED = "compensated"
PARKED = "parked"
STATES = (RUNNING, COMPENSATING, COMPLETED, COMPENSATED, PARKED)
TERMINAL = (COMPLETED, COMPENSATED)

# -- transition types (the platform's saga schemas, evp.platform.<type>) ---------------------
STARTED = "SagaStarted"
STEP_REQUESTED = "SagaStepRequested"
STEP_SUCCEEDED = "SagaStepSucceeded"
STEP_FAILED = "SagaStepFailed"
RETRY_SCHEDULED = "SagaRetryScheduled"
COMPENSATION_REQUESTED = "SagaCompensationRequested"
COMPENSATION_DONE = "SagaCompensationDone"
COMPENSATION_FAILED = "SagaCompensationFailed"
SAGA_COMPLETED = "SagaCompleted"
SAGA_COMPENSATED = "SagaCompensated"
SAGA_PARKED = "SagaParked"
DEADLINE_FIRED = "SagaDeadlineFired"
OPERATOR_ACTION = "SagaOperatorAction"
TRANSITIONS = (STARTED, STEP_REQUESTED, STEP_SUCCEEDED, STEP_FAILED, RETRY_SCHEDULED, COMPENSATION_REQUESTED,
               COMPENSATION_DONE, COMPENSATION_FAILED, SAGA_COMPLETED, SAGA_COMPENSATED, SAGA_PARKED, DEADLINE_FIRED,
               OPERATOR_ACTION)

# -- timers ----------------------------------------------------------------------------------
DEADLINE = "deadline"
RETRY = "retry"

# -- operator actions ------------------------------------------------------------------------
RESUME = "resume"
RETRY_STEP = "retry-step"
MARK_COMPENSATED = "mark-compensated"
OPERATOR_ACTIONS = (RESUME, RETRY_STEP, MARK_COMPENSATED)


class SagaRefused(EvpError):
    """An operator action does not apply to the saga's state; nothing was written."""


@dataclass(frozen=True)
class Timer:
    """The one timer an instance may have: a deadline of the step in flight, or a scheduled retry."""

    kind: str  #: DEADLINE or RETRY
    step: str
    phase: str  #: ACTION or COMPENSATION
    attempt: int
    due_at: str  #: ISO 8601, UTC


@dataclass(frozen=True)
class SagaState:
    """One instance, as the fold of its transitions. ``version`` is its stream's version."""

    saga_id: str
    saga: str
    definition_version: int
    key: str
    trigger_event_id: str
    subject: str | None = None
    status: str = RUNNING
    version: int = 0
    step: str = ""  #: the step in flight (or parked on)
    phase: str = ACTION
    attempt: int = 0
    awaiting: bool = False  #: a command is out and its reply awaited
    command_id: str | None = None  #: the command in flight
    action_commands: Mapping[str, str] = field(default_factory=dict)  #: step -> its action's last command id
    applied: tuple[str, ...] = ()  #: steps that took effect (or may have), in order of completion
    unknown: tuple[str, ...] = ()  #: of those, steps whose deadline expired
    compensated: tuple[str, ...] = ()
    replies: Mapping[str, str] = field(default_factory=dict)  #: step -> id of the reply that succeeded it
    timer: Timer | None = None
    reason: str | None = None
    started_at: str = ""
    updated_at: str = ""

    @property
    def open(self) -> bool:
        return self.status not in TERMINAL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SagaState:
        fields = dict(data)
        timer = fields.pop("timer", None)
        for name in ("applied", "unknown", "compensated"):
            fields[name] = tuple(fields.get(name, ()))
        return cls(**fields, timer=None if timer is None else Timer(**timer))


# -- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    """An event of the saga's ``starts_on`` type."""

    event_id: str
    event_type: str
    key: str
    subject: str | None = None


@dataclass(frozen=True)
class Reply:
    """A participant's answer, correlated to the instance by key."""

    event_id: str
    event_type: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class Fired:
    """The instance's timer came due."""

    timer: Timer


@dataclass(frozen=True)
class Operator:
    """An operator's action on one instance, recorded with its actor and reason."""

    action: str
    actor: str
    reason: str
    step: str | None = None


Input = Trigger | Reply | Fired | Operator


# -- outputs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transition:
    """One saga event to append: its type (a platform schema's name), data and actor ('' = the coordinator)."""

    type: str
    data: Mapping[str, Any]
    actor: str = ""


@dataclass(frozen=True)
class IssuedCommand:
    """A command to append with the transitions, under its idempotency key."""

    event_id: str
    step: str
    phase: str
    attempt: int
    command: Command


@dataclass(frozen=True)
class Decision:
    """What one input does: transitions and commands to append, and the state after them."""

    state: SagaState | None
    transitions: tuple[Transition, ...] = ()
    commands: tuple[IssuedCommand, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.transitions


#: Builds the context a step's action or compensation sees (the coordinator loads the start
#: event and the replies from the ledger; the test fixture keeps them in memory).
ContextFor = Callable[[SagaState, str, int, str | None], SagaContext]


# -- folding transitions ---------------------------------------------------------------------
def evolve(state: SagaState | None, transition: Transition, at: str) -> SagaState:
    """The state after one transition (``at``: when it was recorded, ISO 8601)."""
    data = transition.data
    kind = transition.type
    if kind == STARTED:
        return SagaState(
            saga_id=str(data["saga_id"]), saga=str(data["saga"]), definition_version=int(data["saga_version"]),
            key=str(data["key"]), trigger_event_id=str(data["trigger_event_id"]), subject=data.get("subject"),
            version=1, started_at=at, updated_at=at,
        )
    if state is None:
        raise EvpError(f"saga transition {kind} before SagaStarted")
    moved = replace(state, version=state.version + 1, updated_at=at)
    step = str(data.get("step") or state.step)
    attempt = int(data.get("attempt") or state.attempt)
    if kind in (STEP_REQUESTED, COMPENSATION_REQUESTED):
        phase = ACTION if kind == STEP_REQUESTED else COMPENSATION
        deadline = data.get("deadline_at")
        commands = dict(state.action_commands)
        if phase == ACTION:
            commands[step] = str(data["command_id"])
        return replace(
            moved, status=RUNNING if phase == ACTION else COMPENSATING, step=step, phase=phase, attempt=attempt,
            awaiting=True, command_id=str(data["command_id"]), action_commands=commands,
            timer=None if deadline is None else Timer(DEADLINE, step, phase, attempt, str(deadline)),
        )
    if kind == STEP_SUCCEEDED:
        replies = {**state.replies, step: str(data["reply_event_id"])}
        return replace(moved, applied=(*state.applied, step), replies=replies, awaiting=False, timer=None)
    if kind in (STEP_FAILED, COMPENSATION_FAILED):
        return replace(moved, awaiting=False, timer=None, reason=str(data.get("reason") or ""))
    if kind == DEADLINE_FIRED:
        if data.get("phase") == ACTION:
            return replace(moved, applied=(*state.applied, step), unknown=(*state.unknown, step), awaiting=False,
                           timer=None, reason=f"deadline of step {step!r} expired")
        return replace(moved, awaiting=False, timer=None, reason=f"deadline of the compensation of {step!r} expired")
    if kind == RETRY_SCHEDULED:
        phase = str(data["phase"])
        return replace(moved, step=step, phase=phase, attempt=attempt, awaiting=False,
                       timer=Timer(RETRY, step, phase, attempt, str(data["due_at"])))
    if kind == COMPENSATION_DONE:
        return replace(moved, compensated=(*state.compensated, step), awaiting=False, timer=None)
    if kind == SAGA_COMPLETED:
        return replace(moved, status=COMPLETED, awaiting=False, timer=None, step="")
    if kind == SAGA_COMPENSATED:
        return replace(moved, status=COMPENSATED, awaiting=False, timer=None, step="")
    if kind == SAGA_PARKED:
        return replace(moved, status=PARKED, step=step, phase=str(data.get("phase") or state.phase), attempt=attempt,
                       awaiting=False, timer=None, reason=str(data.get("reason") or ""))
    if kind == OPERATOR_ACTION:
        return moved
    raise EvpError(f"unknown saga transition {kind!r}")


def fold(transitions: Sequence[tuple[Transition, str]]) -> SagaState | None:
    """The state after every (transition, recorded at) in order; None for none."""
    state: SagaState | None = None
    for transition, at in transitions:
        state = evolve(state, transition, at)
    return state


def to_compensate(state: SagaState) -> list[str]:
    """Applied steps not yet compensated, most recently completed first."""
    done = set(state.compensated)
    return [s for s in reversed(state.applied) if s not in done]


# -- deciding --------------------------------------------------------------------------------
class _Decider:
    """Accumulates transitions, evolving the state as it goes, so each rule sees the state so far."""

    def __init__(self, saga: Saga, state: SagaState | None, now: datetime, context_for: ContextFor,
                 check: Callable[[Command], None] | None = None) -> None:
        self.saga, self.state, self.now, self.context_for, self.check = saga, state, now, context_for, check
        self.at = now.isoformat()
        self.transitions: list[Transition] = []
        self.commands: list[IssuedCommand] = []

    def record(self, kind: str, actor: str = "", **data: Any) -> None:
        base: dict[str, Any] = {}
        if self.state is not None:
            s = self.state
            base = {"saga_id": s.saga_id, "saga": s.saga, "saga_version": s.definition_version, "key": s.key,
                    "subject": s.subject}
        transition = Transition(kind, {**base, **data}, actor)
        self.state = evolve(self.state, transition, self.at)
        self.transitions.append(transition)

    def decision(self) -> Decision:
        return Decision(self.state, tuple(self.transitions), tuple(self.commands))

    # -- the rules ------------------------------------------------------------------------
    def start(self, saga_id: str, trigger: Trigger) -> None:
        self.record(STARTED, saga_id=saga_id, saga=self.saga.name, saga_version=self.saga.version, key=trigger.key,
                    subject=trigger.subject, trigger_event_id=trigger.event_id, trigger_type=trigger.event_type,
                    steps=[s.name for s in self.saga.steps])
        self.request(self.saga.steps[0].name, ACTION, 1)

    def request(self, step_name: str, phase: str, attempt: int) -> None:
        """Build the command and record that it was requested; park the saga if the builder raises."""
        state = self.state
        assert state is not None
        step = self.saga.step(step_name)
        builder = step.action if phase == ACTION else step.compensation
        if phase == COMPENSATION and step.irreversible:
            self.record(SAGA_PARKED, step=step_name, attempt=attempt, phase=phase,
                        reason=f"step {step_name!r} cannot be undone; compensation stopped there "
                               f"(it began after: {state.reason or 'an operator action'})")
            return
        if builder is None:  # nothing to undo: compensating it is a no-op
            self.record(COMPENSATION_DONE, step=step_name, attempt=attempt, reply_event_id=None, noop=True)
            self.compensate_next()
            return
        action_command = state.action_commands.get(step_name) if phase == COMPENSATION else None
        try:
            command = builder(self.context_for(state, step_name, attempt, action_command))
            if not isinstance(command, Command):
                raise TypeError(f"returned {command!r}, not a Command")
            if self.check is not None:
                self.check(command)  # a command its schema refuses parks the saga too
        except Exception as err:  # noqa: BLE001 - a bug in the project's builder parks the saga, visibly
            self.record(SAGA_PARKED, step=step_name, attempt=attempt, phase=phase,
                        reason=f"the {phase} of step {step_name!r} raised {type(err).__name__}: {err}")
            return
        event_id = str(command_id(state.saga_id, step_name, attempt, phase))
        deadline = None if step.deadline is None else (self.now + step.deadline).isoformat()
        kind = STEP_REQUESTED if phase == ACTION else COMPENSATION_REQUESTED
        self.record(kind, step=step_name, attempt=attempt, command_id=event_id, command_type=command.type,
                    action_command_id=action_command, deadline_at=deadline)
        self.commands.append(IssuedCommand(event_id, step_name, phase, attempt, command))

    def advance(self) -> None:
        """After a step succeeded: the next step, or completion."""
        state = self.state
        assert state is not None
        names = [s.name for s in self.saga.steps]
        following = names.index(state.step) + 1
        if following < len(names):
            self.request(names[following], ACTION, 1)
        else:
            self.record(SAGA_COMPLETED, steps=list(state.applied))

    def compensate_next(self) -> None:
        state = self.state
        assert state is not None
        remaining = to_compensate(state)
        if remaining:
            self.request(remaining[0], COMPENSATION, 1)
        else:
            self.record(SAGA_COMPENSATED, steps=list(state.compensated))

    def retry_or(self, step_name: str, phase: str, attempt: int, exhausted: Callable[[], None]) -> None:
        step = self.saga.step(step_name)
        policy = step.retry if phase == ACTION else self.saga.compensation_retry
        if attempt < policy.attempts:
            state = self.state
            assert state is not None
            due = self.now + policy.delay(state.saga_id, step_name, attempt + 1)
            self.record(RETRY_SCHEDULED, step=step_name, attempt=attempt + 1, phase=phase, due_at=due.isoformat())
        else:
            exhausted()

    def exhaust(self, step_name: str, attempt: int) -> None:
        """An action's retries are used up: compensate, or park when the step says so."""
        state = self.state
        assert state is not None
        if self.saga.step(step_name).exhausted == "park":
            self.record(SAGA_PARKED, step=step_name, attempt=attempt, phase=ACTION,
                        reason=f"step {step_name!r} failed {attempt} time(s): {state.reason}")
        else:
            self.compensate_next()

    def park_after(self, step_name: str, attempt: int) -> None:
        state = self.state
        assert state is not None
        self.record(SAGA_PARKED, step=step_name, attempt=attempt, phase=COMPENSATION,
                    reason=f"compensation of step {step_name!r} failed {attempt} time(s): {state.reason}")


def input_for(saga: Saga, event_type: str, event_id: str, data: Mapping[str, Any]) -> tuple[str, Input] | None:
    """(correlation key, input) for a log event, or None when the saga does not care about it.

    A start event becomes a :class:`Trigger`, a type some step declares a reply a
    :class:`Reply`; events without a correlation value are ignored.
    """
    short = event_type.rsplit(".", 1)[-1]
    if short.startswith("Saga") and event_type.startswith("evp.platform."):
        return None  # the coordinator's own transitions
    is_start = saga.starts(event_type)
    if not is_start and event_type not in saga.replies() and short not in saga.replies():
        return None
    key = saga.key(event_type, data)
    if key is None:
        return None
    if is_start:
        subject = data.get(saga.subject) if saga.subject else None
        return key, Trigger(event_id, event_type, key, subject if isinstance(subject, str) else None)
    return key, Reply(event_id, event_type, data)


def decide(saga: Saga, state: SagaState | None, received: Input, now: datetime, context_for: ContextFor,
           saga_id: str | None = None, check: Callable[[Command], None] | None = None) -> Decision:
    """The transitions and commands one input causes (the contract in the module docstring).

    ``check`` validates each command before it is issued (the coordinator checks it against
    its schema); what it raises parks the saga, like a builder that raises.
    """
    d = _Decider(saga, state, now, context_for, check)
    if isinstance(received, Trigger):
        if state is None:
            d.start(saga_id or saga.saga_id(received.key), received)
        return d.decision()
    if state is None:
        return d.decision()
    if isinstance(received, Reply):
        _on_reply(d, saga, state, received)
    elif isinstance(received, Fired):
        _on_timer(d, state, received.timer)
    else:
        _on_operator(d, saga, state, received)
    return d.decision()


def _on_reply(d: _Decider, saga: Saga, state: SagaState, reply: Reply) -> None:
    if not state.awaiting or state.status in TERMINAL:
        return
    answered = reply.data.get("command_id")
    if isinstance(answered, str) and answered != state.command_id:
        return  # it answers another command (an earlier attempt, another step)
    meaning = saga.step(state.step).meaning(reply.event_type)
    reason = reply.data.get("reason")
    why = reason if isinstance(reason, str) and reason else reply.event_type.rsplit(".", 1)[-1]
    step, attempt = state.step, state.attempt
    if state.phase == ACTION:
        if meaning == "succeeded":
            d.record(STEP_SUCCEEDED, step=step, attempt=attempt, reply_event_id=reply.event_id,
                     reply_type=reply.event_type)
            d.advance()
        elif meaning == "failed":
            d.record(STEP_FAILED, step=step, attempt=attempt, reason=why, transient=False, reply_event_id=reply.event_id)
            d.compensate_next()
        elif meaning == "transient":
            d.record(STEP_FAILED, step=step, attempt=attempt, reason=why, transient=True, reply_event_id=reply.event_id)
            d.retry_or(step, ACTION, attempt, lambda: d.exhaust(step, attempt))
        return
    if meaning == "compensated":
        d.record(COMPENSATION_DONE, step=step, attempt=attempt, reply_event_id=reply.event_id, noop=False)
        d.compensate_next()
    elif meaning == "compensation_failed":
        d.record(COMPENSATION_FAILED, step=step, attempt=attempt, reason=why, reply_event_id=reply.event_id)
        d.retry_or(step, COMPENSATION, attempt, lambda: d.park_after(step, attempt))


def _on_timer(d: _Decider, state: SagaState, timer: Timer) -> None:
    if state.timer != timer or state.status in TERMINAL:
        return  # a reply or an operator beat it
    if timer.kind == RETRY:
        d.request(timer.step, timer.phase, timer.attempt)
        return
    d.record(DEADLINE_FIRED, step=timer.step, attempt=timer.attempt, phase=timer.phase)
    if timer.phase == ACTION:
        d.compensate_next()  # the step's outcome is unknown: it is compensated too
    else:
        d.retry_or(timer.step, COMPENSATION, timer.attempt, lambda: d.park_after(timer.step, timer.attempt))


def _on_operator(d: _Decider, saga: Saga, state: SagaState, op: Operator) -> None:
    if state.status in TERMINAL:
        raise SagaRefused(f"saga {state.saga_id} is {state.status}: nothing to {op.action}")
    if not op.reason.strip():
        raise SagaRefused(f"{op.action} needs a reason (it is recorded with the action)")
    step = op.step or state.step
    if op.action == RESUME:
        if state.status != PARKED:
            raise SagaRefused(f"saga {state.saga_id} is {state.status}, not parked: resume applies to parked sagas")
        d.record(OPERATOR_ACTION, op.actor, action=op.action, reason=op.reason, step=state.step)
        d.request(state.step, state.phase, state.attempt + 1)
    elif op.action == RETRY_STEP:
        if step != state.step:
            raise SagaRefused(f"saga {state.saga_id}: step {step!r} is not the step in flight ({state.step!r})")
        d.record(OPERATOR_ACTION, op.actor, action=op.action, reason=op.reason, step=step)
        d.request(step, state.phase, state.attempt + 1)
    elif op.action == MARK_COMPENSATED:
        if state.status == RUNNING and state.phase == ACTION and state.awaiting:
            raise SagaRefused(f"saga {state.saga_id} is running step {state.step!r}: there is nothing to mark compensated")
        d.record(OPERATOR_ACTION, op.actor, action=op.action, reason=op.reason, step=state.step)
        if state.phase == COMPENSATION and state.step not in state.compensated:
            d.record(COMPENSATION_DONE, step=state.step, attempt=state.attempt, reply_event_id=None, noop=False)
        d.compensate_next()
    else:
        raise SagaRefused(f"unknown operator action {op.action!r}; known: {', '.join(OPERATOR_ACTIONS)}")
