"""The clinic example end to end: personal measurements are folded decrypted, erased ones are dropped
and the snapshot that held them is purged."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from events.errors import SnapshotPurged
from events.event import Event
from events.ops.forget import forget_subject
from events.settings import Settings
from events.store.client import EventStore
from tests.support.examples import CLINIC, catalog, project
from tests.support.training import logistic, scans
from trainer.runs import replay_run, train_snapshot
from trainer.snapshot import create_snapshot, load_dataset, load_table, verify_snapshot

pytestmark = pytest.mark.services

PROJECT = project(CLINIC)
PATIENTS = 8


@pytest.fixture
def clinic(settings: Settings) -> Iterator[EventStore]:
    with EventStore.open(settings.with_(project=CLINIC), catalog(CLINIC), registration="auto") as opened:
        yield opened


def record_scans(store: EventStore, rows: int) -> None:
    table = scans()
    for i in range(rows):
        scan_id, patient = table.row_ids[i], f"patient-{i % PATIENTS}"
        store.append(scan_id, Event("ScanRecorded", {
            "scan_id": scan_id, "patient_id": patient, "clinician_id": "c1",
            "features": [float(v) for v in table["features"][i]], "signed_by": "Dr One"}))
        if i % 10 != 9:  # every tenth scan is never diagnosed
            store.append(scan_id, Event("DiagnosisRecorded", {
                "scan_id": scan_id, "patient_id": patient, "clinician_id": "c1",
                "diagnosis": "malignant" if table["label"][i] else "benign"}))


def test_scans_are_folded_from_sealed_measurements_and_a_forgotten_patient_drops_out(clinic: EventStore) -> None:
    record_scans(clinic, 200)
    dataset = load_dataset(PROJECT, "scans")
    before = create_snapshot(clinic, dataset)
    table = load_table(clinic, before.snapshot_id)
    assert len(table) == 180
    reference = scans()
    for row, scan_id in enumerate(table.row_ids[:20]):
        source = reference.row_ids.index(scan_id)
        assert np.array_equal(table["features"][row], reference["features"][source])
        assert table["label"][row] == reference["label"][source]

    recipe = logistic()
    run = train_snapshot(clinic, PROJECT, recipe, before.snapshot_id, recipe.parse_config(["device=cpu"]))
    assert run.metrics["accuracy"] >= 0.85 and set(run.metrics) == {"accuracy", "auc", "f1"}
    assert replay_run(clinic, PROJECT, run.run_id).identical

    forget_subject(clinic, "patient-3", reason="request")
    after = create_snapshot(clinic, dataset)
    remaining = load_table(clinic, after.snapshot_id)
    forgotten = {reference.row_ids[i] for i in range(200) if i % PATIENTS == 3}
    assert set(remaining.row_ids) == set(table.row_ids) - forgotten
    # The older snapshot held the erased measurements in its shards: the erasure purged it.
    with pytest.raises(SnapshotPurged, match=f"snapshot {before.snapshot_id} was purged by the erasure of 'patient-3'"):
        verify_snapshot(clinic, before.snapshot_id, PROJECT)
