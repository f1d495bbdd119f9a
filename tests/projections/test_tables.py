"""A declared view's tables in PostgreSQL, without Kafka: batches, erasures, shapes, poison values."""

from __future__ import annotations

import random
import uuid
from datetime import date
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from events.errors import ConfigurationError
from events.privacy.keyring import Keyring
from events.schema.catalog import Catalog
from events.store.log import LogRecord
from projections import tables
from projections.runner import ensure_view_schema
from projections.view import ERASED, View
from tests.support.views import (
    AnnotatorsView, DiagnosesView, ExpectedSamples, PatientsView, Records, SamplesView, clinic_catalog, random_op,
)

pytestmark = pytest.mark.services


def _apply(conn: psycopg.Connection[Any], view: View, records: list[LogRecord]) -> list[Any]:
    layout = view.layout()
    with conn.transaction(), conn.cursor() as cur:
        return tables.apply(cur, view, layout, records)


def _rows(conn: psycopg.Connection[Any], view: View) -> dict[Any, dict[str, Any]]:
    with conn.cursor() as cur:
        return tables.read_rows(cur, view)


def test_random_histories_in_random_batches_equal_the_independent_fold(
    conn: psycopg.Connection[Any], keyring: Keyring, digits_catalog: Catalog
) -> None:
    view = SamplesView()
    ensure_view_schema(conn, view.layout())
    records = Records(keyring, digits_catalog)
    expected = ExpectedSamples()

    @hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, 2**32), st.integers(1, 40), st.data())
    def check(seed: int, count: int, data: st.DataObject) -> None:
        rng, prefix = random.Random(seed), f"h{uuid.uuid4().hex[:6]}-"
        log = []
        for n in range(count):
            stream, event = random_op(rng, expected, prefix, max(2, count // 4), n)
            log.append(records.make(stream, event.type, event.data, occurred=event.occurred_at))
            expected.fold(stream, event.type, event.data, event.occurred_at)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(log)), max_size=5)))
        for start, end in zip([0, *cuts], [*cuts, len(log)]):
            assert _apply(conn, view, log[start:end]) == []
        actual = {k: {c: v for c, v in r.items() if c != "sample_id"} for k, r in _rows(conn, view).items() if k.startswith(prefix)}
        assert actual == expected.restricted(prefix)

    check()


def test_creating_is_idempotent_and_a_changed_declaration_is_refused(conn: psycopg.Connection[Any]) -> None:
    ensure_view_schema(conn, SamplesView().layout())
    ensure_view_schema(conn, SamplesView().layout())

    class Grown(SamplesView):
        columns = {**SamplesView.columns, "extra": "text"}

    with pytest.raises(ConfigurationError, match="view 'samples': table samples_view.samples has columns .*rebuild"):
        ensure_view_schema(conn, Grown().layout())
    with pytest.raises(ConfigurationError, match="holds 'samples', not 'annotators'"):
        ensure_view_schema(conn, AnnotatorsView().layout("samples_view"))


def test_erasures_redact_rows_before_in_and_after_their_batch(
    conn: psycopg.Connection[Any], keyring: Keyring, digits_catalog: Catalog
) -> None:
    view = AnnotatorsView()
    ensure_view_schema(conn, view.layout())
    records = Records(keyring, digits_catalog)

    def reg(a: str) -> LogRecord:
        return records.make(f"annotator-{a}", "AnnotatorRegistered",
                            {"annotator_id": a, "name": f"Name {a}", "email": f"{a}@example.org", "email_index": f"ix-{a}"})

    def forget(s: str) -> LogRecord:
        return records.make(f"erasure-{s}", "SubjectForgotten", {"subject_id": s, "reason": "request"})

    assert _apply(conn, view, [reg("early"), reg("kept"), forget("late")]) == []  # late: forgotten before it exists
    assert _apply(conn, view, [forget("early"), reg("same"), forget("same")]) == []
    assert _apply(conn, view, [reg("late")]) == []
    rows = _rows(conn, view)
    state = {k: (r[ERASED], r["name"] is None, r["email"] is None) for k, r in rows.items()}
    assert state == {"early": (True, True, True), "kept": (False, False, False), "same": (True, True, True),
                     "late": (True, True, True)}
    assert view.open(rows["kept"], "email", keyring) == "kept@example.org"
    assert rows["late"]["email_index"] == "ix-late", "only personal columns are redacted"
    stored = conn.execute("SELECT name_event_id, name_event_type, name_field FROM annotators_view.annotators"
                          " WHERE annotator_id = 'early'").fetchone()
    assert stored == (None, None, None)
    everything = " ".join(r[0] for r in conn.execute("SELECT a::text FROM annotators_view.annotators a"))
    assert "Name " not in everything and "@example.org" not in everything, "plaintext personal data reached the view"


def test_one_event_two_subjects_each_redacted_on_their_own_erasure(conn: psycopg.Connection[Any], keyring: Keyring) -> None:
    catalog = clinic_catalog()
    records = Records(keyring, catalog)
    patients, diagnoses = PatientsView(), DiagnosesView()
    for view in (patients, diagnoses):
        ensure_view_schema(conn, view.layout())
    admitted = records.make("patient-p1", "PatientAdmitted", {
        "patient_id": "p1", "name": "Pat", "mrn": "M-1", "birth_date": date(1980, 2, 3), "admitted_by": "c1"})
    scan = records.make("scan-s1", "ScanRecorded", {
        "scan_id": "s1", "patient_id": "p1", "clinician_id": "c1", "features": [0.5] * 30, "signed_by": "Dr One"})
    diagnosis = [
        records.make("scan-s1", "DiagnosisRecorded", {"scan_id": "s1", "patient_id": "p1", "clinician_id": "c1", "diagnosis": "benign"}),
        records.make("scan-s2", "DiagnosisRevised", {"scan_id": "s2", "patient_id": "p1", "clinician_id": "c2",
                                                      "previous": "benign", "diagnosis": "malignant", "reason": ""}),
        records.make("scan-s1", "DiagnosisRevised", {"scan_id": "s1", "patient_id": "p1", "clinician_id": "c1",
                                                      "previous": "benign", "diagnosis": "malignant", "reason": "second reading"}),
    ]
    log = [admitted, scan, *diagnosis]
    for view in (patients, diagnoses):
        assert _apply(conn, view, log) == []
    pat = _rows(conn, patients)["p1"]
    assert patients.open(pat, "birth_date", keyring, catalog) == date(1980, 2, 3)
    assert (patients.open(pat, "name", keyring), pat["admitted_by"]) == ("Pat", "c1")
    rows = _rows(conn, diagnoses)
    assert {k: (r["diagnosis"], r["revisions"]) for k, r in rows.items()} == {"s1": ("malignant", 1), "s2": ("malignant", 1)}
    assert diagnoses.open(rows["s1"], "signed_by", keyring) == "Dr One"

    forget_clinician = records.make("erasure-c1", "SubjectForgotten", {"subject_id": "c1", "reason": "left"})
    for view in (patients, diagnoses):
        assert _apply(conn, view, [forget_clinician]) == []
    s1 = _rows(conn, diagnoses)["s1"]
    assert (s1["signed_by"], s1[ERASED], s1["diagnosis"]) == (None, True, "malignant")
    assert _rows(conn, patients)["p1"][ERASED] is False, "the patient's data is not the clinician's"


def test_a_value_the_database_refuses_propagates_for_the_runner_to_isolate(
    conn: psycopg.Connection[Any], keyring: Keyring, digits_catalog: Catalog
) -> None:
    view = SamplesView()
    ensure_view_schema(conn, view.layout())
    records = Records(keyring, digits_catalog)
    nul = records.make("sample-n", "SampleSubmitted", {"sample_id": "n", "annotator_id": "a", "features": [1.0], "label": 1, "source": "a\x00b"})
    with pytest.raises(psycopg.DataError):
        _apply(conn, view, [nul])
    assert _rows(conn, view) == {}
