"""What a schema says about personal data: which fields, whose, and which must be unique.

A schema declares its privacy policy in properties, so that no code hard-codes it and every
reader finds it in the schema an event was **written** with (the registry keeps them):

- ``"confluent:tags": ["PII"]`` on a field marks personal data (the ecosystem's convention);
- ``"evp.subject": "<field>"`` on the record names the field holding the data subject's id;
  the same property on a personal field overrides it for that field, so one event can carry
  two people's data (a ticket's customer and its agent), each sealed under their own key;
- ``"evp.unique": "<scope>"`` on a field makes its value unique within ``scope`` across
  streams, enforced on a keyed blind index (the plaintext is never stored);
- ``"evp.blind_index_of": "<field>"`` on a string field has the SDK fill it with the blind
  index of another field, for equality lookups in views; only a field declared unique may
  be indexed (an index of a low-entropy value is a lookup table for it).

Personal fields may have any Avro type. On the wire (:func:`to_wire`) a personal field is a
string (or a nullable string) holding the sealed value, and ``"evp.plain_type"`` keeps the
declared type, so a reader without the project's code still knows how to decode the
plaintext once it has the key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
import json
from typing import Any

from events.errors import SchemaError

PII_TAG = "PII"
TAGS_PROPERTY = "confluent:tags"
SUBJECT_PROPERTY = "evp.subject"
UNIQUE_PROPERTY = "evp.unique"
BLIND_INDEX_PROPERTY = "evp.blind_index_of"
PLAIN_TYPE_PROPERTY = "evp.plain_type"


@dataclass(frozen=True)
class PersonalField:
    """One personal field: whose data it is, and its declared (plaintext) Avro type."""

    name: str
    subject_field: str
    plain_type: Any

    @property
    def is_text(self) -> bool:
        """Sealed as UTF-8 text (a string, nullable or not) rather than as Avro binary."""
        branches = self.plain_type if isinstance(self.plain_type, list) else [self.plain_type]
        return [b for b in branches if b != "null"] == ["string"]


@dataclass(frozen=True)
class UniqueField:
    """A field whose value must be unique within ``scope``; the reservation belongs to a subject."""

    name: str
    scope: str
    subject_field: str | None


@dataclass(frozen=True)
class Policy:
    """The privacy policy of one event type, read from its schema (declared or wire form)."""

    event_type: str
    subject_field: str | None = None
    personal: tuple[PersonalField, ...] = ()
    unique: tuple[UniqueField, ...] = ()
    blind_indexes: tuple[tuple[str, str], ...] = ()  #: (field filled by the SDK, field it indexes)

    def subjects(self, datum: Mapping[str, Any]) -> tuple[str, ...]:
        """Every data subject the datum concerns: the record's subject and each present personal field's."""
        found: list[str] = []
        if self.subject_field is not None and isinstance(datum.get(self.subject_field), str):
            found.append(datum[self.subject_field])
        for field in self.personal:
            if datum.get(field.name) is not None and isinstance(datum.get(field.subject_field), str):
                found.append(datum[field.subject_field])
        return tuple(dict.fromkeys(s for s in found if s))


def policy_of(schema: Mapping[str, Any]) -> Policy:
    """The policy a record schema declares; SchemaError names the field that is wrong.

    Checks, for every declaration alike: a named subject field exists, is a string (or a
    nullable string) and is not itself personal; every personal field has a subject (its
    own or the record's); a unique scope is a non-empty string; a blind index names an
    existing field and is itself a string.
    """
    return _policy(json.dumps(schema, sort_keys=True))


@lru_cache(maxsize=1024)
def _policy(schema_json: str) -> Policy:
    schema = json.loads(schema_json)
    name = _full_name(schema)
    fields = {f["name"]: f for f in schema.get("fields", [])}
    record_subject = schema.get(SUBJECT_PROPERTY)
    if record_subject is not None:
        _check_subject(name, fields, str(record_subject), where="record")
    personal: list[PersonalField] = []
    unique: list[UniqueField] = []
    indexes: list[tuple[str, str]] = []
    for field in schema.get("fields", []):
        fname = field["name"]
        nested = _nested_tag(field.get(PLAIN_TYPE_PROPERTY, field["type"]), fname)
        if nested is not None:
            # Only a top-level field is sealed: a tag deeper down would be silently ignored
            # and its value sent in plaintext, so it is refused.
            raise SchemaError(f"{name}: {nested} is tagged PII inside field {fname!r}; only top-level fields are "
                              f"sealed: tag the whole field {fname!r} instead")
        subject = field.get(SUBJECT_PROPERTY, record_subject)
        if PII_TAG in field.get(TAGS_PROPERTY, ()):
            if subject is None:
                raise SchemaError(f"{name}: field {fname!r} is tagged PII but neither it nor the record names "
                                  f"an {SUBJECT_PROPERTY!r} field")
            _check_subject(name, fields, str(subject), where=f"field {fname!r}")
            personal.append(PersonalField(fname, str(subject), field.get(PLAIN_TYPE_PROPERTY, field["type"])))
        elif SUBJECT_PROPERTY in field:
            raise SchemaError(f"{name}: field {fname!r} names a subject ({SUBJECT_PROPERTY}) but is not tagged PII")
        if UNIQUE_PROPERTY in field:
            scope = field[UNIQUE_PROPERTY]
            if not isinstance(scope, str) or not scope.strip():
                raise SchemaError(f"{name}: field {fname!r}: {UNIQUE_PROPERTY} must name a scope (a non-empty string)")
            unique.append(UniqueField(fname, scope, None if subject is None else str(subject)))
        if BLIND_INDEX_PROPERTY in field:
            source = field[BLIND_INDEX_PROPERTY]
            if source not in fields:
                raise SchemaError(f"{name}: field {fname!r}: {BLIND_INDEX_PROPERTY} names {source!r}, which is not a field")
            if not _is_string(field["type"]):
                raise SchemaError(f"{name}: field {fname!r} holds a blind index and must be a string")
            if UNIQUE_PROPERTY not in fields[source]:
                # An index of a low-entropy value (a birth date, a postcode) is a lookup table
                # for it: whoever holds the index key recovers the value by trying them all.
                raise SchemaError(f"{name}: field {fname!r} indexes {source!r}, which is not declared "
                                  f"{UNIQUE_PROPERTY!r}: blind indexes are only for unique values")
            indexes.append((fname, str(source)))
    subject_names = {p.subject_field for p in personal} | ({record_subject} if record_subject else set())
    for field in personal:
        if field.name in subject_names:
            raise SchemaError(f"{name}: subject field {field.name!r} cannot itself be personal data: "
                              "its value selects the key that encrypts the others")
    return Policy(name, None if record_subject is None else str(record_subject), tuple(personal), tuple(unique),
                  tuple(indexes))


def to_wire(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema as it travels: each personal field a (nullable) string, its declared type kept.

    Idempotent: a wire schema is returned unchanged. A non-null default of a personal field
    is dropped (a sealed value has no meaningful default).
    """
    wire = copy.deepcopy(dict(schema))
    for field in wire.get("fields", []):
        if PII_TAG not in field.get(TAGS_PROPERTY, ()) or PLAIN_TYPE_PROPERTY in field:
            continue
        plain = field["type"]
        nullable = isinstance(plain, list) and "null" in plain
        sealed: Any = ["null", "string"] if nullable else "string"
        if plain == sealed:
            continue
        field["type"] = sealed
        field[PLAIN_TYPE_PROPERTY] = plain
        if field.get("default", None) is not None or (not nullable and "default" in field):
            del field["default"]
    return wire


def to_declared(wire: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`to_wire`: personal fields get their declared types back."""
    declared = copy.deepcopy(dict(wire))
    for field in declared.get("fields", []):
        if PLAIN_TYPE_PROPERTY in field:
            field["type"] = field.pop(PLAIN_TYPE_PROPERTY)
    return declared


def _nested_tag(avro_type: Any, path: str) -> str | None:
    """The path of a PII-tagged field nested anywhere inside ``avro_type``, or None."""
    if isinstance(avro_type, list):
        return next((found for branch in avro_type if (found := _nested_tag(branch, path)) is not None), None)
    if not isinstance(avro_type, dict):
        return None
    if avro_type.get("type") == "record":
        for inner in avro_type.get("fields", []):
            here = f"{path}.{inner.get('name')}"
            if PII_TAG in inner.get(TAGS_PROPERTY, ()):
                return here
            found = _nested_tag(inner.get("type"), here)
            if found is not None:
                return found
        return None
    for key, suffix in (("items", "[]"), ("values", "{}"), ("type", "")):
        if key in avro_type and isinstance(avro_type[key], (dict, list)):
            found = _nested_tag(avro_type[key], path + suffix)
            if found is not None:
                return found
    return None


def _check_subject(name: str, fields: Mapping[str, Any], subject: str, *, where: str) -> None:
    if subject not in fields:
        raise SchemaError(f"{name}: {where}: {SUBJECT_PROPERTY} names {subject!r}, which is not a field")
    if not _is_string(fields[subject]["type"]):
        raise SchemaError(f"{name}: subject field {subject!r} must be a string (it selects a data key)")


def _is_string(avro_type: Any) -> bool:
    branches = avro_type if isinstance(avro_type, list) else [avro_type]
    return [b for b in branches if b != "null"] == ["string"]


def _full_name(schema: Mapping[str, Any]) -> str:
    name = str(schema.get("name", "<unnamed>"))
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"
