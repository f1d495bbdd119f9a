"""The examples' sagas in memory (no services), through the fixture a saga author would use."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from events.project import Project
from projections.sagas import Saga
from projections.sagas.testing import SagaScenario
from tests.support.examples import CLINIC, DIGITS


def _saga(folder: Any, name: str) -> Saga:
    declared = Project.read(folder).load("sagas", name)
    assert isinstance(declared, type) and issubclass(declared, Saga)
    return declared()


def test_a_release_that_misses_its_bar_is_compensated_in_reverse() -> None:
    scenario = SagaScenario(_saga(DIGITS, "release"))
    given = {"release_id": "r9", "bar": 0.99, "epochs": 3}
    assert [c.type for c in scenario.when("ReleaseRequested", given)] == ["CutReleaseSnapshot"]
    train = scenario.when("ReleaseSnapshotCut", {"release_id": "r9", "snapshot_id": "snap-1"})
    assert [(c.type, c.data["snapshot_id"], c.data["epochs"]) for c in train] == [("TrainCandidate", "snap-1", 3)]
    scenario.when("CandidateTrained", {"release_id": "r9", "run_id": "run-7", "accuracy": 0.95})
    evaluate = scenario.when("ModelPromoted", {"release_id": "r9", "run_id": "run-7"})
    assert [(c.type, c.data["bar"]) for c in evaluate] == [("EvaluateModel", 0.99)]

    undo = scenario.when("EvaluationFailed", {"release_id": "r9", "run_id": "run-7", "accuracy": 0.95,
                                              "reason": "below the bar"})
    assert [c.type for c in undo] == ["WithdrawPromotion"]
    assert [c.type for c in scenario.when("PromotionWithdrawn", {"release_id": "r9", "run_id": "run-7"})] == ["RetireModel"]
    last = scenario.when("ModelRetired", {"release_id": "r9", "run_id": "run-7"})
    assert [(c.type, c.data["snapshot_id"]) for c in last] == [("UnreleaseSnapshot", "snap-1")]
    scenario.when("SnapshotUnreleased", {"release_id": "r9", "snapshot_id": "snap-1"})
    state = scenario.state("r9")
    assert state.status == "compensated"
    assert state.compensated == ("promote", "train", "snapshot")
    assert scenario.timeline("r9")[-1] == "SagaCompensated"


def test_a_withdrawal_whose_retraining_keeps_failing_parks_at_the_erasure() -> None:
    scenario = SagaScenario(_saga(CLINIC, "withdrawal"))
    scenario.when("ConsentWithdrawn", {"withdrawal_id": "w1", "patient_id": "pt-1", "retrain_config": []})
    assert scenario.state("w1").subject == "pt-1"  # its transitions show in `evp audit subject pt-1`
    scenario.when("PatientForgotten", {"withdrawal_id": "w1", "patient_id": "pt-1"})
    scenario.when("ConsentSnapshotCut", {"withdrawal_id": "w1", "snapshot_id": "snap-2"})
    retries = []
    for _ in range(3):
        retries += scenario.when("RetrainingFailed", {"withdrawal_id": "w1", "reason": "the recipe diverged"})
        retries += scenario.advance(timedelta(seconds=5))
    assert [c.type for c in retries] == ["RetrainModels", "RetrainModels", "WithdrawSnapshot"]
    scenario.when("SnapshotWithdrawn", {"withdrawal_id": "w1", "snapshot_id": "snap-2"})
    state = scenario.state("w1")
    assert state.status == "parked" and state.step == "forget"
    assert state.reason is not None and "cannot be undone" in state.reason and "the recipe diverged" in state.reason
