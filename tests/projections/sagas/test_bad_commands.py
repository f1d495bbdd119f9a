"""A saga whose command its schema refuses, or whose builder raises, parks with the error instead of losing the step."""

from __future__ import annotations

from typing import Any

import pytest

from events.event import Event
from events.settings import Settings
from events.store.client import EventStore
from projections.sagas import Command, Saga, SagaContext, Step
from projections.sagas.coordinator import SagaCoordinator
from tests.support.sagas import PROJECT, Clock


def _missing_fields(saga: SagaContext) -> Command:
    return Command("StepCommand", {"job_id": saga.key})  # no step, kind, attempt or plan


def _raises(saga: SagaContext) -> Command:
    raise KeyError("snapshot_id")


@pytest.mark.parametrize(("builder", "expected"), [
    (_missing_fields, "InvalidEvent: invalid jobs.StepCommand: field 'step'"),
    (_raises, "KeyError: 'snapshot_id'"),
], ids=["schema-refuses", "builder-raises"])
def test_the_saga_parks_naming_the_error_and_the_trigger_is_not_dead_lettered(
        settings: Settings, builder: Any, expected: str) -> None:
    class Broken(Saga):
        name, starts_on, correlation = "broken", "JobRequested", "job_id"
        steps = (Step("s0", action=builder, succeeded_on=("StepDone",)),)

    settings = settings.with_(project=PROJECT)
    with EventStore.open(settings) as store, SagaCoordinator(settings, [Broken()], clock=Clock()) as coordinator:
        store.append("job-b1", Event("JobRequested", {"job_id": "b1", "steps": 1, "plan": "{}"}))
        store.flush()
        result = coordinator.catch_up()
        store.flush()
        assert result.dead_lettered == 0
        timeline = [e.type.rsplit(".", 1)[-1] for e in store.read_stream("saga-broken-b1", decrypt=False)]
        assert timeline == ["SagaStarted", "SagaParked"]
        parked = store.read_stream("saga-broken-b1", decrypt=False)[-1].data
        assert parked["step"] == "s0" and expected in parked["reason"], parked["reason"]
