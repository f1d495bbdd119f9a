"""The erasure reaches snapshot shards: ``evp forget`` purges those holding the subject's plaintext.

Checked against real services: a clinic patient's measurements are folded decrypted into a
snapshot's shards, so forgetting the patient deletes the shard files and leaves a marker
naming the erasure; the lineage then reports the snapshot as redacted and the run trained on
it as still derived, and every reader (verify, load, re-materialize, train, replay, the CLI)
refuses the snapshot by name. A digits annotator's snapshot holds no personal data of theirs
and is not purged. A dry run purges nothing and lists what it would; an erasure interrupted
between deleting the files and finishing the marker is finished by running it again. The
hook protocol itself (bad answers, failures after the key is gone, hooks that cannot load)
is checked without services.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg
import pytest

from events.errors import ErasureHookError, ErasureIncomplete, SnapshotPurged
from events.ops.erasure import LEFT, PURGED, Purge, run_erasure_hooks
from events.ops.forget import ErasureReport, forget_subject
from events.ops.lineage import DERIVED, KEPT, PLAINTEXT, REDACTED, trace_subject
from events.project import Project
from events.settings import Settings
from events.store.client import EventStore
from tests.privacy.test_forget import seed
from tests.privacy.test_lineage import PATIENTS, SCANS, clinic, clinic_settings, held, report_json, seed_clinic
from tests.support.examples import CLINIC, DIGITS, project
from tests.support.plaintext import run_cli
from tests.support.training import logistic
from trainer.erasure import begin_purge, delete_shards, erasure_of
from trainer.lineage import survey_training, training_holdings
from trainer.purge import PURGE_MARKER, PURGED as MARKER_PURGED, PURGING, read_purge
from trainer.runs import RunRecord, replay_run, train_snapshot
from trainer.snapshot import (
    MANIFEST, check_shards, create_snapshot, load_dataset, load_manifest, load_table, rematerialize, snapshot_dir,
    verify_snapshot,
)

__all__ = ["clinic", "clinic_settings"]  # fixtures of test_lineage, used here

pytestmark = pytest.mark.services


def training(settings: Settings, subject: str) -> dict[tuple[str, str, str], int]:
    return held({"holdings": [h.to_json() for h in training_holdings(settings, project(CLINIC), subject)]})


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("shard-*"))


def trained(store: EventStore) -> tuple[str, RunRecord]:
    """A snapshot of the scans and a run of the logistic recipe on it."""
    snapshot = create_snapshot(store, load_dataset(project(CLINIC), "scans")).snapshot_id
    recipe = logistic()
    return snapshot, train_snapshot(store, project(CLINIC), recipe, snapshot,
                                    recipe.parse_config(["device=cpu", "epochs=2"]))


def test_forgetting_a_patient_purges_the_snapshot_holding_their_measurements_and_every_reader_refuses_it(
    clinic: EventStore, clinic_settings: Settings,
) -> None:
    patients, _ = seed_clinic(clinic, clinic_settings)
    target, theirs = patients[0], SCANS // PATIENTS  # every scan is diagnosed: each patient's are rows
    snapshot, run = trained(clinic)
    folder = snapshot_dir(clinic, snapshot)
    shards = shard_files(folder)
    assert shards == ["shard-00000.bin"]

    report = forget_subject(clinic, target, reason="request 11")

    (purge,) = report.purges
    assert (purge.where, purge.kind, purge.files, purge.state, purge.hook) == \
        (f"snapshot {snapshot}", "shard files", 1, PURGED, "training")
    assert run.run_id in purge.detail and "other machines" in purge.detail and "ScanRecorded.features" in purge.detail
    assert report.hooks == ("training",) and report.hooks_unavailable == {}
    assert shard_files(folder) == [] and (folder / MANIFEST).is_file()  # the manifest stays
    marker = json.loads((folder / PURGE_MARKER).read_text())
    erasure = clinic.read_stream(f"erasure-{target}", decrypt=False)[-1]
    assert marker["state"] == MARKER_PURGED and marker["subject_id"] == target and marker["deleted"] == 1
    assert str(erasure.record.event_id) in marker["erasure"] and marker["purged_at"] and marker["shards"] == shards
    assert load_manifest(clinic, snapshot).snapshot_id == snapshot  # SnapshotCreated stays: what the model saw

    found = training(clinic_settings, target)
    assert found == {
        (f"snapshot {snapshot}", "snapshot rows", REDACTED): theirs,
        (f"snapshot {snapshot}", "shard files", REDACTED): 1,
        (f"run {run.run_id}", "training run", DERIVED): theirs,  # no purge reaches weights
    }
    holdings = {h.kind: h for h in training_holdings(clinic_settings, project(CLINIC), target)}
    assert f"purged by the erasure of {target!r}" in holdings["snapshot rows"].detail
    assert "other machines" in holdings["shard files"].detail
    assert "fitted on data since erased" in holdings["training run"].detail
    assert "retrain" in holdings["training run"].detail and "retire" in holdings["training run"].detail
    # Another patient's rows were in the same shards: gone too, purged by the first erasure.
    assert training(clinic_settings, patients[1])[(f"snapshot {snapshot}", "snapshot rows", REDACTED)] == theirs

    said = f"snapshot {snapshot} was purged by the erasure of {target!r}"
    for refused in (lambda: verify_snapshot(clinic, snapshot, project(CLINIC)),
                    lambda: load_table(clinic, snapshot, project(CLINIC)),  # never re-materialized
                    lambda: load_table(clinic, snapshot),
                    lambda: rematerialize(clinic, load_manifest(clinic, snapshot), project(CLINIC)),
                    lambda: check_shards(folder),
                    lambda: train_snapshot(clinic, project(CLINIC), logistic(), snapshot,
                                           logistic().parse_config(["device=cpu"]))):
        with pytest.raises(SnapshotPurged, match=said) as caught:
            refused()
        assert "cut a new snapshot" in str(caught.value)
    with pytest.raises(SnapshotPurged, match=f"run {run.run_id} cannot be replayed: {said}"):
        replay_run(clinic, project(CLINIC), run.run_id)
    assert shard_files(folder) == []
    cli = run_cli(clinic_settings, "snapshot", "verify", snapshot)
    assert cli.returncode == 1 and said in cli.stderr and "No such file" not in cli.stderr

    again = forget_subject(clinic, target, reason="request 11")  # idempotent: nothing left to purge
    assert again.purges == () and json.loads((folder / PURGE_MARKER).read_text()) == marker


def test_a_digits_annotators_snapshot_holds_nothing_personal_of_theirs_and_is_not_purged(
    store: EventStore, settings: Settings,
) -> None:
    world = seed(store, settings)
    target = world.people[0]
    folder = snapshot_dir(store, world.snapshot_id)
    shards = shard_files(folder)

    report = forget_subject(store, target.annotator_id, reason="request 12")

    assert report.purges == () and report.hooks == ("training",)
    assert shard_files(folder) == shards and not (folder / PURGE_MARKER).exists()
    assert verify_snapshot(store, world.snapshot_id, project(DIGITS)).shards_checked == len(shards)
    after = held(report_json(settings, "--report", target.annotator_id))
    assert after[(f"snapshot {world.snapshot_id}", "snapshot rows", KEPT)] == len(world.sample_ids[target.annotator_id])


def test_a_dry_run_purges_nothing_and_lists_what_it_would_and_the_cli_reports_each_purge(
    clinic: EventStore, clinic_settings: Settings,
) -> None:
    patients, _ = seed_clinic(clinic, clinic_settings)
    first, second = patients[:2]
    snapshot, run = trained(clinic)
    folder = snapshot_dir(clinic, snapshot)

    report = forget_subject(clinic, first, reason="request 13", dry_run=True)
    dry = report_json(clinic_settings, "--dry-run", first)
    text = run_cli(clinic_settings, "forget", "--dry-run", first)

    (purge,) = report.purges
    assert purge.where == f"snapshot {snapshot}" and purge.files == 1 and "would be deleted" in purge.detail
    assert dry["purges"] == [purge.to_json()] and dry["hooks"] == ["training"] and dry["hooks_unavailable"] == {}
    assert text.returncode == 0, text.stderr
    assert f"would purge snapshot {snapshot}: 1 shard files (training): " in text.stdout
    assert shard_files(folder) == ["shard-00000.bin"] and not (folder / PURGE_MARKER).exists()
    assert training(clinic_settings, first)[(f"snapshot {snapshot}", "shard files", PLAINTEXT)] == 1

    assert run_cli(clinic_settings, "schemas", "register").returncode == 0  # this project registers explicitly
    done = run_cli(clinic_settings, "forget", "--reason", "request 13", first, "--json")
    assert done.returncode == 0, done.stderr
    purged = json.loads(done.stdout)
    assert purged["key_destroyed"] and [(p["where"], p["files"], p["state"], p["hook"]) for p in purged["purges"]] \
        == [(f"snapshot {snapshot}", 1, PURGED, "training")]
    shown = run_cli(clinic_settings, "forget", "--report", first)
    assert shown.returncode == 0 and f"purged by the erasure of {first!r}" in shown.stdout
    assert f"out of any erasure's reach (plaintext, or derived from it): run {run.run_id}" in shown.stdout

    # A snapshot cut after the first erasure holds the second patient's measurements: their erasure purges it.
    later = create_snapshot(clinic, load_dataset(project(CLINIC), "scans")).snapshot_id
    spoken = run_cli(clinic_settings, "forget", second)
    assert spoken.returncode == 0, spoken.stderr
    assert f"purged snapshot {later}: 1 shard files (training): " in spoken.stdout
    assert f"snapshot {snapshot}" not in spoken.stdout  # purged before, not again
    assert shard_files(snapshot_dir(clinic, later)) == []


def test_an_erasure_interrupted_between_deleting_the_shards_and_finishing_the_marker_is_finished_by_a_rerun(
    clinic: EventStore, clinic_settings: Settings,
) -> None:
    patients, _ = seed_clinic(clinic, clinic_settings)
    target = patients[0]
    snapshot, _ = trained(clinic)
    folder = snapshot_dir(clinic, snapshot)

    # The key is destroyed and the erasure recorded, then the process dies before any hook ran.
    assert forget_subject(clinic, target, reason="request 14", hooks={}).purges == ()
    shards = {h.kind: h for h in training_holdings(clinic_settings, project(CLINIC), target)}["shard files"]
    assert shards.state == PLAINTEXT and f"evp forget {target} again" in shards.detail

    # The rerun begins the purge and dies after deleting the files, before the marker is finished.
    survey = survey_training(clinic, project(CLINIC), trace_subject(clinic, target))
    (rows,) = [r for r in survey.snapshots if r.manifest.snapshot_id == snapshot]
    marker = begin_purge(folder, rows.manifest, target, erasure_of(survey.trace))
    assert delete_shards(folder, marker) == 1
    begun = read_purge(folder)
    assert begun is not None and begun.state == PURGING and shard_files(folder) == []
    with pytest.raises(SnapshotPurged, match=f"snapshot {snapshot} is being purged by the erasure of {target!r}"):
        load_table(clinic, snapshot, project(CLINIC))
    missing = training(clinic_settings, target)
    assert missing[(f"snapshot {snapshot}", "shard files", PLAINTEXT)] == 1  # not finished: not redacted
    missing_detail = {h.kind: h for h in training_holdings(clinic_settings, project(CLINIC), target)}["shard files"]
    assert "begun and not finished" in missing_detail.detail

    finished = forget_subject(clinic, target, reason="request 14")

    (purge,) = finished.purges
    assert purge.files == 0 and "finished the purge begun at" in purge.detail
    done = read_purge(folder)
    assert done is not None and done.state == MARKER_PURGED and done.started_at == begun.started_at
    assert training(clinic_settings, target)[(f"snapshot {snapshot}", "shard files", REDACTED)] == 1
    with pytest.raises(SnapshotPurged, match=f"snapshot {snapshot} was purged by the erasure of {target!r}"):
        verify_snapshot(clinic, snapshot, project(CLINIC))


# -- the hook protocol, without services -------------------------------------------------------
@pytest.mark.parametrize("answer, says", [
    ("nothing", "returned str, not a list of Purge"),
    (["x"], "returned 'x', not a Purge"),
    ([Purge("snapshot snap-1", "shard files", -1, "")], "files -1 is not a whole number"),
    ([Purge("snapshot snap-1", "shard files", 1, "", state="gone")], "state 'gone' is not one of purged, left"),
])
def test_a_hook_that_answers_wrongly_is_named(base_settings: Settings, answer: object, says: str) -> None:
    with pytest.raises(ErasureHookError, match=f"erasure hook 'bad': .*{says}"):
        run_erasure_hooks(base_settings, None, "ann-1", dry_run=True, hooks={"bad": lambda s, p, x, d: answer})


def test_a_hook_failing_after_the_erasure_leaves_it_standing_and_the_others_still_run(base_settings: Settings) -> None:
    ran: list[str] = []

    def failing(settings: Settings, project: Project | None, subject: str, dry_run: bool) -> list[Purge]:
        raise OSError("disk on fire")

    def fine(settings: Settings, project: Project | None, subject: str, dry_run: bool) -> list[Purge]:
        ran.append(subject)
        return [Purge("snapshot snap-2", "shard files", 0, "dataset x cannot be loaded", state=LEFT)]

    with pytest.raises(ErasureIncomplete, match=r"erasure of 'ann-1' stands .*hook 'a': disk on fire.*"
                                                r"run evp forget ann-1 again"):
        run_erasure_hooks(base_settings, None, "ann-1", dry_run=False, hooks={"a": failing, "b": fine})
    assert ran == ["ann-1"]
    with pytest.raises(OSError, match="disk on fire"):  # a dry run changed nothing: the error as it is
        run_erasure_hooks(base_settings, None, "ann-1", dry_run=True, hooks={"a": failing})
    purges = run_erasure_hooks(base_settings, None, "ann-1", dry_run=False,
                               hooks={"b": fine, "training": "torch is not installed"})
    assert purges.purges == (Purge("snapshot snap-2", "shard files", 0, "dataset x cannot be loaded", LEFT, "b"),)
    assert purges.hooks == ("b",) and purges.unavailable == {"training": "torch is not installed"}


def test_an_erasure_inside_another_transaction_of_the_process_does_not_wait_on_it(
    clinic: EventStore, clinic_settings: Settings,
) -> None:
    """A saga participant forgets inside its batch's transaction, which holds locks on the
    ledger's tables: the hooks read through the erasure's own store, opening none (whose
    migrations would wait on those locks for ever)."""
    patients, _ = seed_clinic(clinic, clinic_settings)
    snapshot, _ = trained(clinic)
    outcome: list[object] = []
    with psycopg.connect(clinic_settings.database_url) as batch:
        batch.execute("LOCK TABLE evp_events IN ROW EXCLUSIVE MODE")  # as an append in the batch does
        erasing = threading.Thread(target=lambda: outcome.append(forget_subject(clinic, patients[0], reason="r")))
        erasing.start()
        erasing.join(timeout=60)
        waited = erasing.is_alive()
        batch.rollback()
    erasing.join()
    assert not waited, "the erasure waited on the transaction"
    (report,) = outcome
    assert isinstance(report, ErasureReport) and [p.where for p in report.purges] == [f"snapshot {snapshot}"]
