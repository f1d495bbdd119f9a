"""The saga coordinator against the real services: completion, compensation, parking, deadlines, idempotency."""

from __future__ import annotations

from events.settings import Settings
from tests.support.sagas import jobs


def test_a_job_completes_and_its_timeline_is_the_same_in_the_ledger_and_on_the_topic(settings: Settings) -> None:
    with jobs(settings) as h:
        h.start("j1", 3)
        states = h.drive(["j1"])
        assert states["j1"].status == "completed"
        assert h.effects() == [("j1", "s0", "action"), ("j1", "s1", "action"), ("j1", "s2", "action")]
        ledger = h.ledger_timeline("saga-job3-j1")
        assert ledger == h.topic_timeline("saga-job3-j1")
        assert [t for _, t in ledger][:3] == ["evp.platform.SagaStarted", "evp.platform.SagaStepRequested", "jobs.StepCommand"]
        assert ledger[-1][1] == "evp.platform.SagaCompleted"


def test_a_business_failure_compensates_the_applied_steps_in_reverse(settings: Settings) -> None:
    with jobs(settings) as h:
        h.start("j2", 4, {"s2/action": ["fail"]})
        states = h.drive(["j2"])
        assert states["j2"].status == "compensated"
        assert h.effects() == [("j2", "s0", "action"), ("j2", "s1", "action"),
                               ("j2", "s1", "compensation"), ("j2", "s0", "compensation")]
