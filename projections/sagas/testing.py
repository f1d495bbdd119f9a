"""An in-memory fixture for saga authors: given events, when an event or elapsed time, expect commands and state.

No services are needed: the fixture runs the same decisions as the coordinator
(:func:`projections.sagas.machine.decide`) with a clock it owns::

    scenario = SagaScenario(Release())
    scenario.when("ReleaseRequested", {"release_id": "r1"})
    assert scenario.commands_of("r1") == [Command("CutSnapshot", {"release_id": "r1"})]
    scenario.when("SnapshotCut", {"release_id": "r1", "snapshot_id": "s1"})
    scenario.advance(timedelta(hours=1))          # deadlines and retries come due
    assert scenario.state("r1").status == "compensated"

Every call returns the commands it caused, so a test reads as given / when / then.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from events.errors import NotFound
from projections.sagas.declaration import Command, Saga, SagaContext
from projections.sagas.machine import (
    Decision, Fired, Input, Operator, SagaState, Transition, Trigger, decide, input_for,
)

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass
class _Instance:
    state: SagaState
    start: Mapping[str, Any]
    replies: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    timeline: list[Transition] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)


class SagaScenario:
    """One saga definition, its instances by key, and a clock that moves only when told to."""

    def __init__(self, saga: Saga, *, now: datetime = EPOCH) -> None:
        saga.check()
        self.saga = saga
        self.now = now
        self._instances: dict[str, _Instance] = {}
        self._data: dict[str, Mapping[str, Any]] = {}  # event id -> data, for the context

    # -- inputs ---------------------------------------------------------------------------
    def given(self, *events: tuple[str, Mapping[str, Any]]) -> SagaScenario:
        """Events that already happened (their commands are kept but not returned)."""
        for event_type, data in events:
            self.when(event_type, data)
        return self

    def when(self, event_type: str, data: Mapping[str, Any], *, event_id: str | None = None) -> list[Command]:
        """An event arrives (a start, a reply, or one the saga ignores); returns the commands it caused."""
        event_id = event_id or str(uuid.uuid4())
        self._data[event_id] = data
        found = input_for(self.saga, event_type, event_id, data)
        if found is None:
            return []
        key, received = found
        instance = self._instances.get(key)
        if instance is None and not isinstance(received, Trigger):
            return []  # a reply for a saga that never started
        decision = decide(self.saga, None if instance is None else instance.state, received, self.now, self._context)
        if instance is None and decision.state is not None:
            instance = self._instances[key] = _Instance(decision.state, data)
        return self._record(instance, decision)

    def advance(self, by: timedelta) -> list[Command]:
        """Move the clock; every timer that comes due fires, earliest first. Returns the commands caused."""
        target = self.now + by
        caused: list[Command] = []
        while True:
            due = sorted((datetime.fromisoformat(i.state.timer.due_at), key) for key, i in self._instances.items()
                         if i.state.timer is not None and datetime.fromisoformat(i.state.timer.due_at) <= target)
            if not due:
                break
            at, key = due[0]
            self.now = max(self.now, at)
            instance = self._instances[key]
            assert instance.state.timer is not None
            caused += self._record(instance, decide(self.saga, instance.state, Fired(instance.state.timer), self.now,
                                                    self._context))
        self.now = target
        return caused

    def operator(self, key: str, action: str, reason: str, *, actor: str = "operator", step: str | None = None
                 ) -> list[Command]:
        """An operator acts (resume, retry-step, mark-compensated); SagaRefused when it does not apply."""
        instance = self._instance(key)
        received: Input = Operator(action, actor, reason, step)
        return self._record(instance, decide(self.saga, instance.state, received, self.now, self._context))

    # -- what happened --------------------------------------------------------------------
    def state(self, key: str) -> SagaState:
        return self._instance(key).state

    def timeline(self, key: str) -> list[str]:
        """The instance's transition types, in order."""
        return [t.type for t in self._instance(key).timeline]

    def transitions(self, key: str) -> list[Transition]:
        return list(self._instance(key).timeline)

    def commands_of(self, key: str) -> list[Command]:
        """Every command the instance issued, in order."""
        return list(self._instance(key).commands)

    def keys(self) -> list[str]:
        return sorted(self._instances)

    # -- internals ------------------------------------------------------------------------
    def _instance(self, key: str) -> _Instance:
        if key not in self._instances:
            raise NotFound(f"no saga {self.saga.name!r} with key {key!r} (started: {self.keys()})")
        return self._instances[key]

    def _record(self, instance: _Instance | None, decision: Decision) -> list[Command]:
        if instance is None or decision.state is None:
            return []
        instance.state = decision.state
        instance.timeline += decision.transitions
        for transition in decision.transitions:
            reply_id = transition.data.get("reply_event_id")
            if transition.type == "SagaStepSucceeded" and isinstance(reply_id, str):
                instance.replies[str(transition.data["step"])] = self._data[reply_id]
        caused = [issued.command for issued in decision.commands]
        instance.commands += caused
        return caused

    def _context(self, state: SagaState, step: str, attempt: int, command_id: str | None) -> SagaContext:
        instance = self._instances.get(state.key)
        start = self._data.get(state.trigger_event_id, {}) if instance is None else instance.start
        replies = {} if instance is None else dict(instance.replies)
        for name, reply_id in state.replies.items():
            replies.setdefault(name, self._data.get(reply_id, {}))
        return SagaContext(state.saga_id, state.key, start, replies, step, attempt, command_id)
