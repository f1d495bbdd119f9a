"""The digits release: cut a snapshot, train a candidate, promote it as a canary, keep it only if it meets the bar.

``Release`` is the saga; ``Releaser`` the participant that does the work and answers. A
release whose evaluation misses its bar is compensated in reverse: the promotion withdrawn,
the candidate retired, the snapshot marked unreleased. Every answer carries the command's
id, so an answer to an earlier attempt is never taken for the current one.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from events.project import Project
from projections.sagas import Command, Retry, Saga, SagaContext, Step
from projections.sagas.participant import Answer, Participant, Received, answers
from trainer.recipe import load_recipe
from trainer.runs import load_run, train_snapshot
from trainer.snapshot import create_snapshot, load_dataset

PROJECT = Path(__file__).resolve().parents[1]


def _release(saga: SagaContext, **more: object) -> dict[str, object]:
    return {"release_id": saga.key, **more}


class Release(Saga):
    name = "release"
    version = 1
    starts_on = "ReleaseRequested"
    correlation = "release_id"
    compensation_retry = Retry(attempts=3, base=timedelta(milliseconds=200), cap=timedelta(seconds=2))
    steps = (
        Step("snapshot",
             action=lambda s: Command("CutReleaseSnapshot", _release(s)),
             compensation=lambda s: Command("UnreleaseSnapshot", _release(
                 s, snapshot_id=s.replies["snapshot"]["snapshot_id"])),
             succeeded_on=("ReleaseSnapshotCut",), compensated_on=("SnapshotUnreleased",),
             deadline=timedelta(minutes=10)),
        Step("train",
             action=lambda s: Command("TrainCandidate", _release(
                 s, snapshot_id=s.replies["snapshot"]["snapshot_id"], epochs=s.start["epochs"])),
             compensation=lambda s: Command("RetireModel", _release(s, run_id=s.replies["train"]["run_id"])),
             succeeded_on=("CandidateTrained",), compensated_on=("ModelRetired",),
             deadline=timedelta(hours=1)),
        Step("promote",
             action=lambda s: Command("PromoteModel", _release(s, run_id=s.replies["train"]["run_id"])),
             compensation=lambda s: Command("WithdrawPromotion", _release(s, run_id=s.replies["train"]["run_id"])),
             succeeded_on=("ModelPromoted",), compensated_on=("PromotionWithdrawn",)),
        Step("evaluate",
             action=lambda s: Command("EvaluateModel", _release(
                 s, run_id=s.replies["train"]["run_id"], bar=s.start["bar"])),
             succeeded_on=("EvaluationPassed",), failed_on=("EvaluationFailed",)),
    )


class Releaser(Participant):
    """Cuts, trains, promotes and evaluates; undoes each on request. Answers on the release's stream."""

    name = "releaser"

    @staticmethod
    def _answer(command: Received, event_type: str, **data: object) -> Answer:
        release = command.data["release_id"]
        return Answer(f"release-{release}", event_type, {"release_id": release, "command_id": command.event_id, **data})

    @answers("CutReleaseSnapshot")
    def cut(self, command: Received) -> Answer:
        manifest = create_snapshot(command.store, load_dataset(Project.read(PROJECT), "digits"))
        return self._answer(command, "ReleaseSnapshotCut", snapshot_id=manifest.snapshot_id)

    @answers("TrainCandidate")
    def train(self, command: Received) -> Answer:
        project = Project.read(PROJECT)
        recipe = load_recipe(project, "mlp")
        config = recipe.parse_config([f"epochs={command.data['epochs']}"])
        run = train_snapshot(command.store, project, recipe, command.data["snapshot_id"], config)
        return self._answer(command, "CandidateTrained", run_id=run.run_id, accuracy=run.metrics["accuracy"])

    @answers("PromoteModel")
    def promote(self, command: Received) -> Answer:
        return self._answer(command, "ModelPromoted", run_id=command.data["run_id"])

    @answers("EvaluateModel")
    def evaluate(self, command: Received) -> Answer:
        run = load_run(command.store, command.data["run_id"])
        accuracy, bar = run.metrics["accuracy"], command.data["bar"]
        if accuracy >= bar:
            return self._answer(command, "EvaluationPassed", run_id=run.run_id, accuracy=accuracy)
        return self._answer(command, "EvaluationFailed", run_id=run.run_id, accuracy=accuracy,
                            reason=f"held-out accuracy {accuracy:.4f} is below the bar {bar:.4f}")

    @answers("WithdrawPromotion")
    def withdraw(self, command: Received) -> Answer:
        return self._answer(command, "PromotionWithdrawn", run_id=command.data["run_id"])

    @answers("RetireModel")
    def retire(self, command: Received) -> Answer:
        return self._answer(command, "ModelRetired", run_id=command.data["run_id"])

    @answers("UnreleaseSnapshot")
    def unrelease(self, command: Received) -> Answer:
        return self._answer(command, "SnapshotUnreleased", snapshot_id=command.data["snapshot_id"])
