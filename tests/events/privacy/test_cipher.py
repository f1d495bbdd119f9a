"""The field cipher and the blind index: pure functions, checked as properties."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.privacy import cipher
from events.errors import CryptoError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
AAD = cipher.field_aad("ev-1", "LabelAssigned", "annotator_email", "annotator-7")

aad_parts = st.tuples(st.text(), st.text(), st.text(), st.text())


def _raw(sealed: str) -> bytes:
    body = sealed[len(cipher.SEALED_PREFIX) :]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _text(raw: bytes) -> str:
    return cipher.SEALED_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


@given(st.text())
def test_any_text_round_trips(plaintext: str) -> None:
    sealed = cipher.seal_text(KEY, plaintext, AAD)
    assert cipher.is_sealed(sealed)
    assert cipher.open_text(KEY, sealed, AAD) == plaintext


def test_sealed_text_is_prefixed_base64url_of_nonce_and_ciphertext() -> None:
    sealed = cipher.seal_text(KEY, "ada@example.org", AAD)
    assert sealed.startswith("evp1:")
    assert set(sealed[5:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(_raw(sealed)) == cipher.NONCE_BYTES + len(b"ada@example.org") + cipher.TAG_BYTES


@pytest.mark.parametrize(
    "text", ["evp1:", "evp1:hello", "evp1:" + "A" * 37, "evp1:" + "A" * 37 + "!", "EVP1:" + "A" * 40]
)
def test_text_that_merely_starts_like_sealed_text_is_not_sealed(text: str) -> None:
    assert not cipher.is_sealed(text)


def test_two_seals_of_the_same_text_differ() -> None:
    first, second = (cipher.seal_text(KEY, "same", AAD) for _ in range(2))
    assert first != second
    assert cipher.open_text(KEY, first, AAD) == cipher.open_text(KEY, second, AAD) == "same"


@pytest.mark.parametrize(
    "moved_to",
    [
        ("ev-2", "LabelAssigned", "annotator_email", "annotator-7"),  # another event
        ("ev-1", "LabelCorrected", "annotator_email", "annotator-7"),  # another event type
        ("ev-1", "LabelAssigned", "annotator_name", "annotator-7"),  # another field
        ("ev-1", "LabelAssigned", "annotator_email", "annotator-8"),  # another subject
    ],
    ids=["event-id", "event-type", "field", "subject"],
)
def test_a_ciphertext_moved_elsewhere_does_not_open(moved_to: tuple[str, str, str, str]) -> None:
    sealed = cipher.seal_text(KEY, "ada@example.org", AAD)
    with pytest.raises(CryptoError, match="tampered or moved"):
        cipher.open_text(KEY, sealed, cipher.field_aad(*moved_to))


@given(st.text(max_size=40), st.data())
def test_any_flipped_bit_is_detected(plaintext: str, data: st.DataObject) -> None:
    raw = bytearray(_raw(cipher.seal_text(KEY, plaintext, AAD)))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CryptoError, match="tampered or moved"):
        cipher.open_text(KEY, _text(bytes(raw)), AAD)


def test_the_wrong_data_key_does_not_open() -> None:
    with pytest.raises(CryptoError, match="failed authentication"):
        cipher.open_text(OTHER_KEY, cipher.seal_text(KEY, "x", AAD), AAD)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("plain text", "not sealed"),
        ("evp1:***", "base64url"),
        (_text(b"too short"), "too short"),
    ],
)
def test_malformed_sealed_text_is_refused(text: str, reason: str) -> None:
    with pytest.raises(CryptoError, match=reason):
        cipher.open_text(KEY, text, AAD)


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_data_keys_must_be_aes_256(length: int) -> None:
    with pytest.raises(CryptoError, match=f"got {length}"):
        cipher.seal_text(os.urandom(length), "x", AAD)


@given(aad_parts, aad_parts)
def test_field_aad_is_unambiguous(first: tuple[str, ...], second: tuple[str, ...]) -> None:
    assert (cipher.field_aad(*first) == cipher.field_aad(*second)) == (first == second)


def test_field_aad_does_not_confuse_shifted_boundaries() -> None:
    assert cipher.field_aad("ab", "c", "f", "s") != cipher.field_aad("a", "bc", "f", "s")


emails = st.emails()
padding = st.text(alphabet=" \t\n", max_size=3)


@given(emails, padding, padding, st.booleans())
def test_blind_index_is_equal_for_equal_normalised_emails(email: str, before: str, after: str, upper: bool) -> None:
    variant = before + (email.upper() if upper else email.swapcase()) + after
    assert cipher.blind_index(KEY, "email", variant) == cipher.blind_index(KEY, "email", email)


@given(emails, emails)
def test_blind_index_differs_for_different_emails(first: str, second: str) -> None:
    same = first.casefold() == second.casefold()
    assert (cipher.blind_index(KEY, "email", first) == cipher.blind_index(KEY, "email", second)) == same


def test_blind_index_differs_across_fields_and_keys() -> None:
    value = "ada@example.org"
    reference = cipher.blind_index(KEY, "email", value)
    assert cipher.blind_index(KEY, "backup_email", value) != reference
    assert cipher.blind_index(OTHER_KEY, "email", value) != reference
    assert len(reference) == 64 and int(reference, 16) >= 0  # hex SHA-256
    assert value not in reference


def test_blind_index_normalisation_can_be_replaced() -> None:
    exact = cipher.blind_index(KEY, "name", "Ada", normalise=lambda value: value)
    assert exact != cipher.blind_index(KEY, "name", "ada", normalise=lambda value: value)
    assert cipher.blind_index(KEY, "name", "Ada") == cipher.blind_index(KEY, "name", " ada ")


def test_blind_index_refuses_a_short_key() -> None:
    with pytest.raises(CryptoError, match="at least 16 bytes"):
        cipher.blind_index(b"short", "email", "x")
