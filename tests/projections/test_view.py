"""Declaring a view: what a declaration compiles to, and the errors that name what is wrong."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

import pytest

from events.errors import ConfigurationError, CryptoError, InvalidEvent, KeyErased
from events.privacy.keyring import Keyring
from events.store.log import LogRecord
from projections.view import ERASED, Row, Sealed, View, ViewDefinitionError, on, personal, sealed
from tests.support.views import AnnotatorsView, DiagnosesView, PatientsView, Records, SamplesView, clinic_catalog


def _record(event_type: str, data: dict[str, Any]) -> LogRecord:
    return LogRecord(0, 0, "s-1", 1, uuid.uuid4(), event_type, 1, "", "", data)


def test_a_declaration_compiles_to_a_layout_with_generated_columns() -> None:
    layout = AnnotatorsView().layout()
    assert (layout.view, layout.schema, layout.table, layout.key.name) == ("annotators", "annotators_view", "annotators", "annotator_id")
    assert [c.name for c in layout.personal] == ["name", "email"]
    assert layout.subjects() == {"annotator_id": ("name", "email")}
    assert [n for n, _ in layout.stored()] == [
        "annotator_id", "name", "name_event_id", "name_event_type", "name_field",
        "email", "email_event_id", "email_event_type", "email_field", "email_index", "registered_at", ERASED,
    ]
    assert layout.masked == "annotators_masked"
    assert layout.with_schema("elsewhere").schema == "elsewhere" and AnnotatorsView().layout("x").schema == "x"
    assert ERASED not in dict(SamplesView().layout().stored()), "a view without personal columns has no erased flag"


def test_handlers_are_found_by_short_or_full_name_and_other_types_are_ignored() -> None:
    view = SamplesView()
    assert view.handler_for("digits.SampleSubmitted") is not None
    assert view.handler_for("SampleSubmitted") is not None
    assert view.handler_for("digits.AnnotatorRegistered") is None
    assert view.handler_for("evp.platform.SubjectForgotten") is None
    key_field, _ = view.handler_for("clinic.DiagnosisRevised") or ("", None)
    assert key_field == ""  # not this view's
    assert DiagnosesView().handler_for("clinic.DiagnosisRevised") is not None


def _declare(**attributes: Any) -> type[View]:
    body = {"name": "things", "key": "thing_id", "columns": {"thing_id": "text", "owner": "text"}} | attributes
    return type("Things", (View,), body)


@pytest.mark.parametrize(("attributes", "words"), [
    ({"name": "Bad-Name"}, "name"),
    ({"key": "nope"}, "key"),
    ({"columns": {}}, "columns"),
    ({"columns": {"thing_id": "text; DROP TABLE x"}}, "column 'thing_id'"),
    ({"columns": {"thing_id": "text", "Owner": "text"}}, "column 'Owner'"),
    ({"columns": {"thing_id": "real[]"}}, "key"),
    ({"columns": {"thing_id": "text", "mail": personal(subject="owner")}}, "column 'mail'"),
    ({"columns": {"thing_id": "text", "owner": "text", "mail": personal(subject="nobody")}}, "subject 'nobody'"),
    ({"columns": {"thing_id": "text", "owner": "text", "mail": personal(subject="owner"), "mail_field": "text"}},
     "column 'mail_field'"),
    ({"columns": {"thing_id": "text", "owner": "text", "mail": personal(subject="owner")}, "analyst": ("mail",)},
     "analysts never see personal"),
    ({"analyst": ("ghost",)}, "analyst"),
    ({"indexes": ("ghost",)}, "indexes"),
    ({"schema": "x" * 64}, "schema"),
])
def test_a_bad_declaration_is_refused_naming_the_view_and_the_attribute(attributes: dict[str, Any], words: str) -> None:
    with pytest.raises(ViewDefinitionError, match=f"view '.*': .*{words}") as caught:
        _declare(**attributes)
    assert isinstance(caught.value, ConfigurationError)


def test_a_view_cannot_handle_erasures_itself_nor_one_type_twice() -> None:
    def handler(self: View, row: Row | None, record: LogRecord) -> Row | None:
        return row

    with pytest.raises(ViewDefinitionError, match="erasures are handled by evp"):
        _declare(forget=on("SubjectForgotten")(handler))
    with pytest.raises(ViewDefinitionError, match="already has handler"):
        _declare(a=on("X")(handler), b=on("X")(lambda self, row, record: row))


def test_an_abstract_base_is_checked_only_in_its_subclasses() -> None:
    class Base(View, abstract=True):
        key = "thing_id"
        columns = {"thing_id": "text", "n": "integer"}

        @on("Counted", key="id")
        def counted(self, row: Row | None, record: LogRecord) -> Row:
            return {"n": (row or {}).get("n", 0) + 1}

    class Counts(Base):
        name = "counts"

    key_field, handler = Counts().handler_for("x.Counted") or ("", None)
    assert key_field == "id" and handler is not None
    assert handler(None, _record("x.Counted", {"id": "a"})) == {"n": 1}


def test_sealed_refuses_plaintext_and_keeps_what_opening_needs(keyring: Keyring) -> None:
    records = Records(keyring, clinic_catalog())
    record = records.make("patient-p1", "PatientAdmitted", {
        "patient_id": "p1", "name": "Ada", "mrn": "M-1", "birth_date": date(1990, 5, 17), "admitted_by": "c1"})
    value = sealed(record, "name")
    assert isinstance(value, Sealed) and value.value.startswith("evp1:")
    assert (value.event_id, value.event_type, value.field) == (record.event_id, "clinic.PatientAdmitted", "name")
    assert value.open("p1", keyring) == "Ada"
    row = {"patient_id": "p1", "birth_date": sealed(record, "birth_date")}
    assert PatientsView().open(row, "birth_date", keyring, clinic_catalog()) == date(1990, 5, 17)
    assert PatientsView().open({"patient_id": "p1", "name": None}, "name", keyring) is None
    with pytest.raises(CryptoError, match="no data key"):
        value.open("p2", keyring)
    keyring.data_key("p2", create=True)
    with pytest.raises(CryptoError, match="authentication"):
        value.open("p2", keyring)  # sealed for another subject
    with pytest.raises(ViewDefinitionError, match="admitted_by: is not a personal column"):
        PatientsView().open({"admitted_by": "c1"}, "admitted_by", keyring)
    keyring.forget("p1")
    with pytest.raises(KeyErased):
        value.open("p1", keyring)
    plain = _record("clinic.PatientAdmitted", {"name": "Ada"})
    with pytest.raises(InvalidEvent, match="name.*unencrypted"):
        sealed(plain, "name")
    assert sealed(_record("x.Y", {"name": None}), "name") is None
