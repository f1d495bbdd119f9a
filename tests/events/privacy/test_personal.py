"""Sealing and opening personal fields of whole records, as the schema's policy says."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import assume, given
from hypothesis import strategies as st

from events.errors import CryptoError, InvalidEvent, KeyErased, SchemaError
from events.privacy import cipher
from events.privacy.kek import LocalKek
from events.privacy.keyring import Keyring, MemoryKeyStore
from events.privacy.personal import REDACTED, blind_index, open_fields, seal
from events.privacy.policy import policy_of, to_declared, to_wire

#: A ticket carries two people's data: the customer's (the record's subject) and the agent's.
TICKET: dict[str, Any] = {
    "type": "record", "name": "TicketOpened", "namespace": "helpdesk", "evp.subject": "customer_id",
    "fields": [
        {"name": "ticket_id", "type": "string"},
        {"name": "customer_id", "type": "string"},
        {"name": "agent_id", "type": "string"},
        {"name": "customer_name", "type": "string", "confluent:tags": ["PII"]},
        {"name": "customer_email", "type": "string", "confluent:tags": ["PII"], "evp.unique": "customer-email"},
        {"name": "birth_date", "type": {"type": "int", "logicalType": "date"}, "confluent:tags": ["PII"]},
        {"name": "vitals", "type": {"type": "array", "items": "double"}, "confluent:tags": ["PII"]},
        {"name": "phone", "type": ["null", "string"], "default": None, "confluent:tags": ["PII"]},
        {"name": "agent_name", "type": "string", "confluent:tags": ["PII"], "evp.subject": "agent_id"},
        {"name": "priority", "type": "int"},
    ],
}
POLICY = policy_of(TICKET)
EVENT = "helpdesk.TicketOpened"


def _keyring() -> Keyring:
    return Keyring(MemoryKeyStore(), LocalKek.generate())


def _ticket(**changes: Any) -> dict[str, Any]:
    return {
        "ticket_id": "t-1", "customer_id": "cus-1", "agent_id": "ag-1", "customer_name": "Ada Lovelace",
        "customer_email": "ada@example.org", "birth_date": dt.date(1815, 12, 10), "vitals": [36.6, 72.0],
        "phone": None, "agent_name": "Bo Marchetti", "priority": 2,
    } | changes


def _through_the_wire(datum: dict[str, Any]) -> dict[str, Any]:
    """Encode with the wire schema and decode again, as the topic would."""
    parsed = parse_schema(to_wire(TICKET))
    out = io.BytesIO()
    schemaless_writer(out, parsed, datum)
    out.seek(0)
    result = schemaless_reader(out, parsed, None)
    assert isinstance(result, dict)
    return result


def test_the_policy_names_each_field_and_its_own_subject() -> None:
    assert POLICY.subject_field == "customer_id"
    owners = {f.name: f.subject_field for f in POLICY.personal}
    assert owners == {"customer_name": "customer_id", "customer_email": "customer_id", "birth_date": "customer_id",
                      "vitals": "customer_id", "phone": "customer_id", "agent_name": "agent_id"}
    assert [(u.name, u.scope, u.subject_field) for u in POLICY.unique] == [("customer_email", "customer-email",
                                                                           "customer_id")]
    assert POLICY.subjects(_ticket()) == ("cus-1", "ag-1")


def test_personal_fields_of_any_type_round_trip_through_the_wire_schema() -> None:
    keyring, datum = _keyring(), _ticket()
    sealed = seal(POLICY, "ev-1", datum, keyring)
    assert datum == _ticket()  # the input is not modified
    for field in ("customer_name", "customer_email", "birth_date", "vitals", "agent_name"):
        assert isinstance(sealed[field], str) and cipher.is_sealed(sealed[field]), field
    assert sealed["phone"] is None and sealed["priority"] == 2
    assert open_fields(POLICY, "ev-1", _through_the_wire(sealed), keyring) == datum


@given(st.text(), st.lists(st.floats(allow_nan=False, width=64), max_size=40),
       st.dates(min_value=dt.date(1900, 1, 1)), st.one_of(st.none(), st.text()))
def test_any_values_round_trip_and_never_appear_in_the_sealed_record(
    name: str, vitals: list[float], born: dt.date, phone: str | None
) -> None:
    assume(not cipher.is_sealed(name) and (phone is None or not cipher.is_sealed(phone)))
    keyring = _keyring()
    datum = _ticket(customer_name=name, vitals=vitals, birth_date=born, phone=phone)
    sealed = seal(POLICY, "ev-1", datum, keyring)
    assert all(cipher.is_sealed(sealed[f]) for f in ("customer_name", "vitals", "birth_date"))
    assert open_fields(POLICY, "ev-1", _through_the_wire(sealed), keyring) == datum


def test_forgetting_one_person_redacts_only_their_fields() -> None:
    keyring = _keyring()
    sealed = seal(POLICY, "ev-1", _ticket(), keyring)
    keyring.forget("cus-1")
    opened = open_fields(POLICY, "ev-1", sealed, keyring)
    for field in ("customer_name", "customer_email", "birth_date", "vitals"):
        assert opened[field] == REDACTED, field
    assert opened["agent_name"] == "Bo Marchetti"  # the agent's data is under the agent's key
    assert opened["priority"] == 2 and opened["ticket_id"] == "t-1"


def test_a_forgotten_subject_is_not_accepted_again() -> None:
    keyring = _keyring()
    keyring.forget("ag-1")
    with pytest.raises(KeyErased):
        seal(POLICY, "ev-1", _ticket(), keyring)


def test_a_value_moved_to_another_field_or_record_fails_authentication() -> None:
    keyring = _keyring()
    sealed = seal(POLICY, "ev-1", _ticket(), keyring)
    with pytest.raises(CryptoError, match="authentication"):
        open_fields(POLICY, "ev-2", sealed, keyring)
    swapped = sealed | {"customer_name": sealed["customer_email"]}
    with pytest.raises(CryptoError, match="authentication"):
        open_fields(POLICY, "ev-1", swapped, keyring)


def test_missing_subject_is_named() -> None:
    with pytest.raises(InvalidEvent, match="agent_id"):
        seal(POLICY, "ev-1", _ticket(agent_id=""), _keyring())


def test_plaintext_in_a_personal_field_is_refused_on_read_and_sealed_twice_on_write() -> None:
    keyring = _keyring()
    with pytest.raises(CryptoError, match="not encrypted"):
        open_fields(POLICY, "ev-1", _ticket(vitals="36.6"), keyring)
    sealed = seal(POLICY, "ev-1", _ticket(), keyring)
    with pytest.raises(InvalidEvent, match="twice"):
        seal(POLICY, "ev-1", _ticket(customer_name=sealed["customer_name"]), keyring)


def test_wire_and_declared_forms_are_inverse_and_wire_is_idempotent() -> None:
    wire = to_wire(TICKET)
    assert to_wire(wire) == wire
    assert to_declared(wire) == TICKET
    types = {f["name"]: f["type"] for f in wire["fields"]}
    assert types["birth_date"] == "string" and types["vitals"] == "string" and types["phone"] == ["null", "string"]
    assert policy_of(wire) == POLICY  # readers get the same policy from the registered form


@pytest.mark.parametrize(("change", "named"), [
    ({"evp.subject": "nobody"}, "nobody"),
    ({"evp.subject": "priority"}, "priority"),
])
def test_a_bad_record_subject_is_named(change: dict[str, Any], named: str) -> None:
    with pytest.raises(SchemaError, match=named):
        policy_of(TICKET | change)


def test_personal_data_without_any_subject_is_refused_naming_the_field() -> None:
    schema = {**TICKET, "fields": [f for f in TICKET["fields"]]}
    del schema["evp.subject"]
    with pytest.raises(SchemaError, match="customer_name"):
        policy_of(schema)


def test_a_subject_field_cannot_be_personal() -> None:
    fields = [dict(f) for f in TICKET["fields"]]
    fields[1]["confluent:tags"] = ["PII"]
    with pytest.raises(SchemaError, match="customer_id"):
        policy_of({**TICKET, "fields": fields})


def test_a_unique_field_needs_a_scope() -> None:
    fields = [dict(f) for f in TICKET["fields"]]
    fields[4]["evp.unique"] = ""
    with pytest.raises(SchemaError, match="customer_email"):
        policy_of({**TICKET, "fields": fields})


def test_blind_indexes_are_keyed_normalised_and_scoped() -> None:
    keyring = _keyring()
    assert blind_index(keyring, "email", " Ada@Example.org") == blind_index(keyring, "email", "ada@example.org")
    assert blind_index(keyring, "email", "ada@example.org") != blind_index(keyring, "login", "ada@example.org")
    assert blind_index(keyring, "email", "ada@example.org") != blind_index(_keyring(), "email", "ada@example.org")
    assert blind_index(keyring, "mrn", 12345) == blind_index(keyring, "mrn", 12345)


def test_a_blind_index_of_a_field_that_is_not_unique_is_refused() -> None:
    fields = [*TICKET["fields"], {"name": "birth_index", "type": "string", "evp.blind_index_of": "birth_date"}]
    with pytest.raises(SchemaError, match="birth_date.*not declared 'evp.unique'"):
        policy_of({**TICKET, "fields": fields})
    indexed = [*TICKET["fields"], {"name": "email_index", "type": "string", "evp.blind_index_of": "customer_email"}]
    assert policy_of({**TICKET, "fields": indexed}).blind_indexes == (("email_index", "customer_email"),)


@pytest.mark.parametrize("wrap", [
    lambda r: r, lambda r: ["null", r], lambda r: {"type": "array", "items": r}, lambda r: {"type": "map", "values": r},
])
def test_a_pii_tag_nested_inside_a_field_is_refused_not_ignored(wrap: Any) -> None:
    contact = {"type": "record", "name": "Contact", "fields": [
        {"name": "email", "type": "string", "confluent:tags": ["PII"]}]}
    fields = [*TICKET["fields"], {"name": "contact", "type": wrap(contact)}]
    with pytest.raises(SchemaError, match=r"contact.*email.*tag the whole field 'contact'"):
        policy_of({**TICKET, "fields": fields})
