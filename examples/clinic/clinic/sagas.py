"""Consent withdrawal: forget the patient, cut a snapshot without them, retrain every model that saw them, retire the old ones.

``Withdrawal`` is the saga; ``Consent`` the participant that does the work and answers.
Forgetting is irreversible (crypto-shredding cannot be undone), so a withdrawal whose
retraining keeps failing compensates what it can — the snapshot cut for the retraining is
withdrawn — and then **parks** at the erasure with the reason, for an operator: the
patient stays forgotten, and the models that saw them still need replacing.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from events.errors import EvpError
from events.ops.forget import erasure_scope, forget_subject
from events.project import Project
from projections.sagas import Command, Retry, Saga, SagaContext, Step
from projections.sagas.participant import Answer, Participant, Received, answers
from trainer.recipe import load_recipe
from trainer.runs import RunRecord, runs_of_snapshot, train_snapshot
from trainer.snapshot import create_snapshot, load_dataset

PROJECT = Path(__file__).resolve().parents[1]


def _withdrawal(saga: SagaContext, **more: object) -> dict[str, object]:
    return {"withdrawal_id": saga.key, **more}


class Withdrawal(Saga):
    name = "consent-withdrawal"
    version = 1
    starts_on = "ConsentWithdrawn"
    correlation = "withdrawal_id"
    subject = "patient_id"  # the saga's transitions show in `evp audit subject <patient>`
    steps = (
        Step("forget",
             action=lambda s: Command("ForgetPatient", _withdrawal(s, patient_id=s.start["patient_id"])),
             succeeded_on=("PatientForgotten",), irreversible=True),
        Step("snapshot",
             action=lambda s: Command("CutConsentSnapshot", _withdrawal(s)),
             compensation=lambda s: Command("WithdrawSnapshot", _withdrawal(
                 s, snapshot_id=s.replies["snapshot"]["snapshot_id"])),
             succeeded_on=("ConsentSnapshotCut",), compensated_on=("SnapshotWithdrawn",)),
        Step("retrain",
             action=lambda s: Command("RetrainModels", _withdrawal(
                 s, patient_id=s.start["patient_id"], snapshot_id=s.replies["snapshot"]["snapshot_id"],
                 config=s.start["retrain_config"])),
             succeeded_on=("ModelsRetrained",), transient_on=("RetrainingFailed",),
             retry=Retry(attempts=3, base=timedelta(milliseconds=200), cap=timedelta(seconds=1)),
             deadline=timedelta(hours=2)),
        Step("retire",
             action=lambda s: Command("RetireModels", _withdrawal(s, run_ids=s.replies["retrain"]["replaced"])),
             succeeded_on=("ModelsRetired",)),
    )


def models_that_saw(events: Received, patient_id: str) -> list[RunRecord]:
    """Every training run on a snapshot that held the patient's data (the lineage in the log)."""
    runs = [run for snapshot in erasure_scope(events.store, patient_id).snapshots
            for run in runs_of_snapshot(events.store, snapshot)]
    return list({run.run_id: run for run in runs if run.replay_of is None}.values())


class Consent(Participant):
    """Forgets, cuts, retrains and retires; answers on the withdrawal's stream."""

    name = "consent"

    @staticmethod
    def _answer(command: Received, event_type: str, **data: object) -> Answer:
        withdrawal = command.data["withdrawal_id"]
        return Answer(f"withdrawal-{withdrawal}", event_type,
                      {"withdrawal_id": withdrawal, "command_id": command.event_id, **data})

    @answers("ForgetPatient")
    def forget(self, command: Received) -> Answer:
        patient = command.data["patient_id"]
        forget_subject(command.store, patient, reason=f"consent withdrawn ({command.data['withdrawal_id']})")
        return self._answer(command, "PatientForgotten", patient_id=patient)

    @answers("CutConsentSnapshot")
    def cut(self, command: Received) -> Answer:
        manifest = create_snapshot(command.store, load_dataset(Project.read(PROJECT), "scans"))
        return self._answer(command, "ConsentSnapshotCut", snapshot_id=manifest.snapshot_id)

    @answers("RetrainModels")
    def retrain(self, command: Received) -> Answer:
        project = Project.read(PROJECT)
        old = models_that_saw(command, command.data["patient_id"])
        try:
            new = []
            for run in old:
                # The same recipe and config as the run it replaces, with the withdrawal's overrides.
                recipe = load_recipe(project, run.recipe)
                overrides = list(command.data["config"])
                typed = recipe.parse_config(overrides)
                changes = {text.partition("=")[0].strip(): None for text in overrides}
                config = replace(recipe.config_from_json(run.config_json),
                                 **{name: getattr(typed, name) for name in changes})
                new.append(train_snapshot(command.store, project, recipe, command.data["snapshot_id"], config).run_id)
        except EvpError as err:
            return self._answer(command, "RetrainingFailed", reason=f"retraining failed: {err}")
        return self._answer(command, "ModelsRetrained", run_ids=new, replaced=[run.run_id for run in old])

    @answers("RetireModels")
    def retire(self, command: Received) -> Answer:
        return self._answer(command, "ModelsRetired", run_ids=command.data["run_ids"])

    @answers("WithdrawSnapshot")
    def withdraw(self, command: Received) -> Answer:
        return self._answer(command, "SnapshotWithdrawn", snapshot_id=command.data["snapshot_id"])
