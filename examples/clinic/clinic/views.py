"""The clinic project's views: admitted patients, and the diagnosis of every scan.

Declared with evp's public API only (:mod:`projections.view`).
"""

from __future__ import annotations

from events.store.log import LogRecord
from projections.view import Row, View, occurred_at, on, personal, sealed


class PatientsView(View):
    """Admitted patients; name, record number and birth date stay sealed under the patient's key."""

    name = "patients"
    key = "patient_id"
    columns = {
        "patient_id": "text",
        "name": personal(subject="patient_id"),
        "mrn": personal(subject="patient_id"),
        "birth_date": personal(subject="patient_id"),
        "admitted_by": "text",
        "admitted_at": "timestamptz",
    }
    analyst = ("patient_id", "admitted_by", "admitted_at")

    @on("PatientAdmitted")
    def admitted(self, row: Row | None, record: LogRecord) -> Row:
        return {
            "name": sealed(record, "name"), "mrn": sealed(record, "mrn"), "birth_date": sealed(record, "birth_date"),
            "admitted_by": record.data["admitted_by"], "admitted_at": occurred_at(record),
        }


class DiagnosesView(View):
    """One row per scan: who it belongs to, who signed it, the current diagnosis.

    The signature is the clinician's personal data (sealed under the clinician's key), so
    forgetting the clinician clears it while the diagnosis stays; ``revisions`` counts the
    revisions. A diagnosis of a scan not recorded yet starts the row.
    """

    name = "diagnoses"
    key = "scan_id"
    columns = {
        "scan_id": "text",
        "patient_id": "text",
        "clinician_id": "text",
        "diagnosis": "text",
        "revisions": "integer",
        "signed_by": personal(subject="clinician_id"),
    }
    analyst = ("scan_id", "patient_id", "clinician_id", "diagnosis", "revisions")
    indexes = ("patient_id",)

    @on("ScanRecorded")
    def recorded(self, row: Row | None, record: LogRecord) -> Row:
        data = record.data
        return (row or {"diagnosis": None, "revisions": 0}) | {
            "patient_id": data["patient_id"], "clinician_id": data["clinician_id"], "signed_by": sealed(record, "signed_by"),
        }

    @on("DiagnosisRecorded")
    def diagnosed(self, row: Row | None, record: LogRecord) -> Row:
        data = record.data
        base = row or {"patient_id": data["patient_id"], "clinician_id": data["clinician_id"], "revisions": 0}
        return base | {"diagnosis": data["diagnosis"]}

    @on("DiagnosisRevised")
    def revised(self, row: Row | None, record: LogRecord) -> Row:
        data = record.data
        base = row or {"patient_id": data["patient_id"], "clinician_id": data["clinician_id"], "revisions": 0}
        return base | {"diagnosis": data["diagnosis"], "revisions": (base.get("revisions") or 0) + 1}
