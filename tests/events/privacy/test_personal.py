"""Sealing and opening the personal fields of whole records."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from events.privacy import cipher
from events.errors import CryptoError, InvalidEvent, KeyErased, SchemaError
from events.privacy.kek import LocalKek
from events.privacy.keyring import Keyring, MemoryKeyStore
from events.privacy.personal import REDACTED, PersonalData, StaticCatalog, blind_index

LABEL = "LabelAssigned"
CATALOG = StaticCatalog(
    {
        LABEL: (("annotator_email", "annotator_name"), "annotator_id"),
        "SampleIngested": ((), None),
    }
)
PERSONAL = PersonalData(CATALOG)


def _keyring() -> Keyring:
    return Keyring(MemoryKeyStore(), LocalKek.generate())


def _label(**changes: Any) -> dict[str, Any]:
    return {
        "sample_id": "s-1",
        "label": 7,
        "annotator_id": "ann-7",
        "annotator_email": "ada@example.org",
        "annotator_name": "Ada Lovelace",
    } | changes


def test_seal_then_open_round_trips_and_leaves_other_fields_alone() -> None:
    keyring, datum = _keyring(), _label()
    sealed = PERSONAL.seal(LABEL, "ev-1", datum, keyring)
    assert datum == _label()  # the input is not modified
    unchanged = ("sample_id", "label", "annotator_id")
    assert {k: sealed[k] for k in unchanged} == {k: datum[k] for k in unchanged}
    assert cipher.is_sealed(sealed["annotator_email"]) and cipher.is_sealed(sealed["annotator_name"])
    assert PERSONAL.open(LABEL, "ev-1", sealed, keyring) == datum


@given(st.text(), st.text())
def test_any_personal_text_round_trips_and_never_appears_in_the_sealed_record(email: str, name: str) -> None:
    assume(not cipher.is_sealed(email) and not cipher.is_sealed(name))
    keyring = _keyring()
    sealed = PERSONAL.seal(LABEL, "ev-1", _label(annotator_email=email, annotator_name=name), keyring)
    assert sealed["annotator_email"] != email and sealed["annotator_name"] != name
    assert PERSONAL.open(LABEL, "ev-1", sealed, keyring) == _label(annotator_email=email, annotator_name=name)


def test_no_plaintext_personal_data_in_any_sealed_value() -> None:
    datum = _label()
    sealed = PERSONAL.seal(LABEL, "ev-1", datum, _keyring())
    for secret in ("ada@example.org", "Ada Lovelace", "Lovelace", "example.org"):
        assert not any(secret in str(value) for value in sealed.values())


def test_a_forgotten_subject_reads_as_redacted() -> None:
    keyring = _keyring()
    sealed = PERSONAL.seal(LABEL, "ev-1", _label(), keyring)
    other = PERSONAL.seal(LABEL, "ev-2", _label(annotator_id="ann-8"), keyring)
    keyring.forget("ann-7")
    opened = PERSONAL.open(LABEL, "ev-1", sealed, keyring)
    assert opened == _label(annotator_email=REDACTED, annotator_name=REDACTED)
    assert PERSONAL.open(LABEL, "ev-2", other, keyring) == _label(annotator_id="ann-8")


def test_a_forgotten_subject_cannot_be_sealed_again() -> None:
    keyring = _keyring()
    keyring.forget("ann-7")
    with pytest.raises(KeyErased):
        PERSONAL.seal(LABEL, "ev-1", _label(), keyring)


@pytest.mark.parametrize("subject", [None, "", "   "])
def test_personal_data_without_a_subject_names_the_subject_field(subject: str | None) -> None:
    with pytest.raises(InvalidEvent, match="annotator_id"):
        PERSONAL.seal(LABEL, "ev-1", _label(annotator_id=subject), _keyring())


def test_already_sealed_values_are_refused() -> None:
    keyring = _keyring()
    sealed = PERSONAL.seal(LABEL, "ev-1", _label(), keyring)
    with pytest.raises(InvalidEvent, match=r"annotator_email.*already encrypted"):
        PERSONAL.seal(LABEL, "ev-1", sealed, keyring)


def test_a_non_string_personal_value_is_refused() -> None:
    with pytest.raises(InvalidEvent, match=r"annotator_name.*string"):
        PERSONAL.seal(LABEL, "ev-1", _label(annotator_name=42), _keyring())


def test_null_personal_values_stay_null_and_need_no_key() -> None:
    keyring = _keyring()
    datum = _label(annotator_email=None, annotator_name=None, annotator_id=None)
    assert PERSONAL.seal(LABEL, "ev-1", datum, keyring) == datum
    assert PERSONAL.open(LABEL, "ev-1", datum, keyring) == datum


def test_event_types_without_personal_fields_pass_through_untouched() -> None:
    keyring = _keyring()
    datum = {"sample_id": "s-1", "pixels": b"\x00\x01"}
    assert PERSONAL.seal("SampleIngested", "ev-1", datum, keyring) == datum
    assert PERSONAL.seal("Unknown", "ev-1", datum, keyring) == datum


@pytest.mark.parametrize(
    ("event_id", "change"),
    [
        ("ev-2", {}),  # copied into another event
        ("ev-1", {"annotator_id": "ann-8"}),  # re-attributed to another subject
    ],
)
def test_a_record_moved_or_reattributed_does_not_open(event_id: str, change: dict[str, str]) -> None:
    keyring = _keyring()
    keyring.data_key("ann-8", create=True)
    sealed = PERSONAL.seal(LABEL, "ev-1", _label(), keyring)
    with pytest.raises(CryptoError):
        PERSONAL.open(LABEL, event_id, sealed | change, keyring)


def test_swapping_two_sealed_fields_does_not_open() -> None:
    keyring = _keyring()
    sealed = PERSONAL.seal(LABEL, "ev-1", _label(), keyring)
    swapped = sealed | {"annotator_email": sealed["annotator_name"], "annotator_name": sealed["annotator_email"]}
    with pytest.raises(CryptoError, match="tampered or moved"):
        PERSONAL.open(LABEL, "ev-1", swapped, keyring)


def test_plaintext_where_a_sealed_value_belongs_is_an_error() -> None:
    with pytest.raises(CryptoError, match=r"annotator_email.*not encrypted"):
        PERSONAL.open(LABEL, "ev-1", _label(), _keyring())


def test_sealed_data_of_a_subject_without_any_key_is_an_error() -> None:
    sealed = PERSONAL.seal(LABEL, "ev-1", _label(), _keyring())
    with pytest.raises(CryptoError, match="no data key"):
        PERSONAL.open(LABEL, "ev-1", sealed, _keyring())


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ((("annotator_email",), None), "names no 'evp.subject'"),
        ((("annotator_id", "annotator_email"), "annotator_id"), "cannot itself be personal"),
    ],
)
def test_an_unusable_catalog_entry_is_a_schema_error(entry: tuple[tuple[str, ...], str | None], reason: str) -> None:
    personal = PersonalData(StaticCatalog({LABEL: entry}))
    with pytest.raises(SchemaError, match=reason):
        personal.seal(LABEL, "ev-1", _label(), _keyring())


def test_blind_index_matches_normalised_values_and_survives_a_new_keyring() -> None:
    store, kek = MemoryKeyStore(), LocalKek.generate()
    first, second = Keyring(store, kek), Keyring(store, kek)
    index = blind_index(first, "annotator_email", "ada@example.org")
    assert blind_index(second, "annotator_email", "  ADA@Example.org ") == index
    assert blind_index(second, "annotator_name", "ada@example.org") != index
    assert blind_index(_keyring(), "annotator_email", "ada@example.org") != index
