"""Sealing and opening the personal fields of a record, as its schema's policy says.

The policy (:mod:`events.privacy.policy`) comes from the schema: the producer seals with
the schema it writes, a reader opens with the schema the event was written with, so
audit, forget and restore work without the project's code.

A personal field's plaintext is its UTF-8 text when its declared type is a string, and
its Avro binary encoding under the declared type otherwise (a date, a number, an array of
measurements); either is sealed with AES-256-GCM under the key of the field's own subject,
bound to (event id, event type, field, subject).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from events.errors import CryptoError, InvalidEvent, KeyErased, NotFound
from events.privacy import cipher
from events.privacy.keyring import Keyring, subject_problem
from events.privacy.policy import PersonalField, Policy

#: What a personal field reads as once its subject was forgotten, whatever its type.
REDACTED = "[erased]"


def seal(policy: Policy, event_id: str, datum: Mapping[str, Any], keyring: Keyring) -> dict[str, Any]:
    """A copy of ``datum`` (already valid for the declared schema) with personal fields sealed.

    1. Null personal values stay null; every other one needs its subject's id, a valid one
       (no whitespace at either end, no control characters, NFC; see
       :func:`~events.privacy.keyring.subject_problem`), else :class:`InvalidEvent` names
       the subject field: a look-alike id never gets a key of its own.
    2. Each subject's data key is created on first use; a forgotten subject raises
       :class:`KeyErased`: a forgotten person's data is not accepted again.
    3. A value that is already sealed is refused (it would be encrypted twice).
    """
    out = dict(datum)
    for field in policy.personal:
        value = out.get(field.name)
        if value is None:
            continue
        if isinstance(value, str) and cipher.is_sealed(value):
            raise InvalidEvent(policy.event_type, field.name, "already encrypted; refusing to encrypt it twice")
        subject = _subject(policy, field, out)
        problem = subject_problem(subject)
        if problem is not None:
            raise InvalidEvent(policy.event_type, field.subject_field,
                               f"the data subject id {subject!r} {problem}, but field {field.name!r} carries personal data")
        key = keyring.data_key(subject, create=True)
        aad = cipher.field_aad(event_id, policy.event_type, field.name, subject)
        out[field.name] = cipher.seal_bytes(key, _plaintext(field, value), aad)
    return out


def open_fields(policy: Policy, event_id: str, datum: Mapping[str, Any], keyring: Keyring) -> dict[str, Any]:
    """A copy of ``datum`` with personal fields decrypted to their declared types.

    A forgotten subject's fields read :data:`REDACTED` (the rest of the record, and other
    subjects' fields, stay readable). Raises :class:`CryptoError` for a value that is not
    sealed, was tampered with or moved, or whose subject never had a key.
    """
    out = dict(datum)
    for field in policy.personal:
        value = out.get(field.name)
        if value is None:
            continue
        if not isinstance(value, str) or not cipher.is_sealed(value):
            raise CryptoError(f"{policy.event_type} field {field.name!r} holds personal data that is not encrypted")
        subject = _subject(policy, field, out)
        try:
            key = keyring.data_key(subject, create=False)
        except KeyErased:
            out[field.name] = REDACTED
            continue
        except NotFound as err:
            raise CryptoError(f"{policy.event_type} holds personal data of subject {subject!r}, "
                              "who has no data key") from err
        aad = cipher.field_aad(event_id, policy.event_type, field.name, subject)
        out[field.name] = _value(field, cipher.open_bytes(key, value, aad))
    return out


def blind_index(keyring: Keyring, scope: str, value: Any) -> str:
    """The blind index of ``value`` within ``scope`` (a field name or a uniqueness scope).

    Strings are normalised (stripped, casefolded); other values index their canonical JSON.
    """
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return cipher.blind_index(keyring.index_key(), scope, text)


def _subject(policy: Policy, field: PersonalField, datum: Mapping[str, Any]) -> str:
    subject = datum.get(field.subject_field)
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidEvent(policy.event_type, field.subject_field,
                           f"the data subject id is missing or empty, but field {field.name!r} carries personal data")
    return subject


def _plaintext(field: PersonalField, value: Any) -> bytes:
    if field.is_text:
        return str(value).encode("utf-8")
    out = io.BytesIO()
    schemaless_writer(out, _parsed(json.dumps(field.plain_type, sort_keys=True)), value)
    return out.getvalue()


def _value(field: PersonalField, plain: bytes) -> Any:
    if field.is_text:
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CryptoError(f"field {field.name!r} decrypted to bytes that are not UTF-8") from err
    try:
        return schemaless_reader(io.BytesIO(plain), _parsed(json.dumps(field.plain_type, sort_keys=True)), None)
    except Exception as err:  # noqa: BLE001 - authenticated bytes that do not decode: a writer bug
        raise CryptoError(f"field {field.name!r} decrypted to bytes that are not its declared type: {err}") from err


@lru_cache(maxsize=256)
def _parsed(plain_type_json: str) -> Any:
    return parse_schema(json.loads(plain_type_json), _write_hint=False)
