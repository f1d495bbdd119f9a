"""The scans dataset: each diagnosed scan's 30 measurements and its current diagnosis.

- ``ScanRecorded`` gives the 30 measurements. They are the patient's personal data: evp
  hands them to the dataset decrypted. When the patient was forgotten they read as
  ``REDACTED`` and the scan is dropped, so no erased measurement reaches a shard;
- ``DiagnosisRecorded`` and ``DiagnosisRevised`` set the label: 0 benign, 1 malignant.

A scan without a diagnosis (or a diagnosis without its scan) has a column missing and is
left out of the snapshot.
"""

from __future__ import annotations

from trainer.dataset import REDACTED, Column, Dataset, Row, SourceEvent, handles

LABELS = {"benign": 0, "malignant": 1}


class Scans(Dataset):
    name = "scans"
    version = 1
    row_id = "scan_id"
    columns = (Column("features", "float32", (30,)), Column("label", "int64"))

    @handles("ScanRecorded")
    def recorded(self, event: SourceEvent, row: Row) -> None:
        features = event.data["features"]
        if features == REDACTED:
            row.remove()
        else:
            row.set(features=features)

    @handles("DiagnosisRecorded", "DiagnosisRevised")
    def diagnosed(self, event: SourceEvent, row: Row) -> None:
        row.set(label=LABELS[event.data["diagnosis"]])
