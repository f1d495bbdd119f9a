"""Field cipher and blind index: pure functions, no keys stored, no I/O.

A personal-data field keeps its Avro type ``string``; its value becomes
``"evp1:" + base64url(nonce | ciphertext | tag)`` (AES-256-GCM, 12-byte random nonce),
the same idea as Confluent's field-level encryption, so readers without the key still
decode the record and see an opaque string.

The associated data (:func:`field_aad`) names the event id, event type, field and data
subject the value belongs to: a ciphertext copied into another record, another field or
under another subject fails authentication instead of decrypting to a plausible lie.

Equality lookups never compare plaintext: :func:`blind_index` is a keyed HMAC-SHA256 of
the normalised value, domain-separated by field name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from events.errors import CryptoError

#: Marks a sealed string value; the digit is the format version.
SEALED_PREFIX = "evp1:"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

#: Unpadded base64url needs ceil(4n/3) characters for n bytes: 38 for a nonce and a tag.
_MIN_BODY_CHARS = -(-4 * (NONCE_BYTES + TAG_BYTES) // 3)
_SEALED_SHAPE = re.compile(re.escape(SEALED_PREFIX) + "[A-Za-z0-9_-]{" + str(_MIN_BODY_CHARS) + ",}")
_AAD_DOMAIN = b"evp-field-v1"
_INDEX_DOMAIN = b"evp-blind-index-v1"


def length_prefixed(*parts: str | bytes) -> bytes:
    """Concatenate ``parts``, each preceded by its byte length (4 bytes, big endian).

    Plain concatenation is ambiguous (``"ab" + "c" == "a" + "bc"``); a length prefix makes
    every distinct tuple of parts a distinct byte string.
    """
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8") if isinstance(part, str) else part
        out += len(raw).to_bytes(4, "big")
        out += raw
    return bytes(out)


def field_aad(event_id: str, event_type: str, field: str, subject_id: str) -> bytes:
    """Associated data binding a field's ciphertext to where it belongs.

    Layout: ``length_prefixed(b"evp-field-v1", event_id, event_type, field, subject_id)``.
    Changing this layout makes every existing ciphertext unreadable: add a new version
    (``evp2:``) instead.
    """
    return length_prefixed(_AAD_DOMAIN, event_id, event_type, field, subject_id)


def is_sealed(value: str) -> bool:
    """True when ``value`` has the sealed-text shape (it may still fail to open).

    The shape is the prefix followed by unpadded base64url long enough for a nonce and a
    tag, so ordinary text that merely starts with ``evp1:`` is not mistaken for sealed.
    """
    return _SEALED_SHAPE.fullmatch(value) is not None


def seal_text(data_key: bytes, plaintext: str, aad: bytes) -> str:
    """Encrypt ``plaintext`` (as UTF-8) under ``data_key`` with a fresh random nonce."""
    return seal_bytes(data_key, plaintext.encode("utf-8"), aad)


def seal_bytes(data_key: bytes, plaintext: bytes, aad: bytes) -> str:
    """Encrypt ``plaintext`` under ``data_key`` with a fresh random nonce, as sealed text."""
    nonce = os.urandom(NONCE_BYTES)
    body = _aead(data_key).encrypt(nonce, plaintext, aad)
    return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + body).decode("ascii").rstrip("=")


def open_text(data_key: bytes, sealed: str, aad: bytes) -> str:
    """Decrypt a value made by :func:`seal_text` with the same key and associated data.

    Raises :class:`CryptoError` if the text is malformed, or if authentication fails: the
    value was tampered with, moved to another record/field/subject, or the key is wrong.
    """
    plain = open_bytes(data_key, sealed, aad)
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError as err:  # authenticated, so only a writer bug gets here
        raise CryptoError("sealed value decrypted to bytes that are not UTF-8") from err


def open_bytes(data_key: bytes, sealed: str, aad: bytes) -> bytes:
    """Decrypt a value made by :func:`seal_bytes`; the same errors as :func:`open_text`."""
    if not sealed.startswith(SEALED_PREFIX):
        raise CryptoError(f"value is not sealed text (no {SEALED_PREFIX!r} prefix)")
    encoded = sealed[len(SEALED_PREFIX) :]
    try:
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as err:
        raise CryptoError(f"sealed text is not valid base64url: {err}") from err
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError(f"sealed text is too short ({len(raw)} bytes) to hold a nonce and a tag")
    nonce, body = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
    try:
        return _aead(data_key).decrypt(nonce, body, aad)
    except InvalidTag as err:
        raise CryptoError(
            "sealed value failed authentication: it was tampered or moved to another "
            "record, field or subject, or the data key is wrong"
        ) from err


def normalise_identifier(value: str) -> str:
    """Default blind-index normalisation: strip surrounding space, then casefold.

    Suits e-mail addresses and user names, where ``" Ada@Example.org"`` and
    ``"ada@example.org"`` name the same person.
    """
    return value.strip().casefold()


def blind_index(
    index_key: bytes,
    field: str,
    value: str,
    *,
    normalise: Callable[[str], str] = normalise_identifier,
) -> str:
    """Keyed HMAC-SHA256 (hex) of ``normalise(value)``, separated by ``field``.

    Equal normalised values in the same field give equal indexes, so a view can look a
    person up by e-mail without storing the e-mail; the same value in another field, or
    under another key, gives an unrelated index.
    """
    if len(index_key) < 16:
        raise CryptoError(f"blind-index key must be at least 16 bytes, got {len(index_key)}")
    message = length_prefixed(_INDEX_DOMAIN, field, normalise(value))
    return hmac.new(index_key, message, hashlib.sha256).hexdigest()


def _aead(data_key: bytes) -> AESGCM:
    if len(data_key) != KEY_BYTES:
        raise CryptoError(f"data key must be {KEY_BYTES} bytes (AES-256), got {len(data_key)}")
    return AESGCM(data_key)
