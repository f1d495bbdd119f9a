"""Sealing and opening the personal-data fields of a record.

A schema tags personal fields (``"confluent:tags": ["PII"]``) and names the field holding
the data subject's id (record property ``"evp.subject"``). :class:`PersonalData` seals
those fields before a record leaves the process and opens them for readers; it asks a
:class:`PersonalFieldCatalog` which fields those are, so it does not depend on how
schemas are loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from events.privacy import cipher
from events.errors import CryptoError, InvalidEvent, KeyErased, NotFound, SchemaError
from events.privacy.keyring import Keyring

#: What a personal field reads as once its subject was forgotten.
REDACTED = "[erased]"


class PersonalFieldCatalog(Protocol):
    """Which fields of an event type are personal, and which field names the subject."""

    def personal_fields(self, event_type: str) -> tuple[str, ...]: ...

    def subject_field(self, event_type: str) -> str | None: ...


class StaticCatalog:
    """A :class:`PersonalFieldCatalog` from a mapping ``event type -> (fields, subject field)``.

    Event types missing from the mapping have no personal fields.
    """

    def __init__(self, entries: Mapping[str, tuple[tuple[str, ...], str | None]]) -> None:
        self._entries = dict(entries)

    def personal_fields(self, event_type: str) -> tuple[str, ...]:
        return self._entries.get(event_type, ((), None))[0]

    def subject_field(self, event_type: str) -> str | None:
        return self._entries.get(event_type, ((), None))[1]


class PersonalData:
    """Seals personal fields on the way out and opens them on the way in."""

    def __init__(self, catalog: PersonalFieldCatalog) -> None:
        self._catalog = catalog

    def seal(self, event_type: str, event_id: str, datum: Mapping[str, Any], keyring: Keyring) -> dict[str, Any]:
        """A copy of ``datum`` with every personal field sealed under its subject's key.

        The subject's key is created on first use. Null personal values stay null.
        Raises :class:`InvalidEvent` for a missing subject id, a non-string personal value
        or an already sealed one, and :class:`KeyErased` for a forgotten subject: a
        forgotten person's data is not accepted again.
        """
        out, present, subject = self._personal_part(event_type, datum)
        if not present:
            return out
        data_key = keyring.data_key(subject, create=True)
        for field in present:
            value = out[field]
            if not isinstance(value, str):
                raise InvalidEvent(
                    event_type, field, f"personal data must be a string to be encrypted, got {type(value).__name__}"
                )
            if cipher.is_sealed(value):
                raise InvalidEvent(event_type, field, "already encrypted; refusing to encrypt it twice")
            out[field] = cipher.seal_text(data_key, value, cipher.field_aad(event_id, event_type, field, subject))
        return out

    def open(self, event_type: str, event_id: str, datum: Mapping[str, Any], keyring: Keyring) -> dict[str, Any]:
        """A copy of ``datum`` with personal fields decrypted.

        For a forgotten subject each personal value becomes :data:`REDACTED` (the record
        is still readable). Raises :class:`CryptoError` for a value that is not sealed,
        was tampered with or moved, or whose subject has no key at all.
        """
        out, present, subject = self._personal_part(event_type, datum)
        if not present:
            return out
        for field in present:
            if not isinstance(out[field], str) or not cipher.is_sealed(out[field]):
                raise CryptoError(f"{event_type} field {field!r} holds personal data that is not encrypted")
        try:
            data_key = keyring.data_key(subject, create=False)
        except KeyErased:
            return out | {field: REDACTED for field in present}
        except NotFound as err:
            raise CryptoError(f"{event_type} holds personal data of subject {subject!r}, who has no data key") from err
        for field in present:
            out[field] = cipher.open_text(data_key, out[field], cipher.field_aad(event_id, event_type, field, subject))
        return out

    def _personal_part(self, event_type: str, datum: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], str]:
        """A copy of ``datum``, its non-null personal fields, and their subject ("" when there are none)."""
        out = dict(datum)
        fields, subject_field = self._policy(event_type)
        present = [field for field in fields if out.get(field) is not None]
        subject = self._subject(event_type, subject_field, out) if present else ""
        return out, present, subject

    def _policy(self, event_type: str) -> tuple[tuple[str, ...], str]:
        fields = tuple(self._catalog.personal_fields(event_type))
        subject_field = self._catalog.subject_field(event_type)
        if fields and not subject_field:
            raise SchemaError(f"{event_type} tags personal fields {list(fields)} but names no 'evp.subject' field")
        if subject_field in fields:
            raise SchemaError(
                f"{event_type}: subject field {subject_field!r} cannot itself be personal data: "
                "its value selects the key that encrypts the others"
            )
        return fields, subject_field or ""

    @staticmethod
    def _subject(event_type: str, subject_field: str, datum: Mapping[str, Any]) -> str:
        subject = datum.get(subject_field)
        if not isinstance(subject, str) or not subject.strip():
            raise InvalidEvent(
                event_type,
                subject_field,
                "the data subject id is missing or empty, but the record carries personal data",
            )
        return subject


def blind_index(keyring: Keyring, field: str, value: str) -> str:
    """The blind index of ``value`` in ``field``, under the keyring's index key."""
    return cipher.blind_index(keyring.index_key(), field, value)
