"""Events to Kafka record values and back, in the Confluent wire format.

A value is ``0x00 | schema id (4 bytes, big endian) | Avro binary``, so any Kafka tool
with a Confluent deserializer can read evp's topics. Several event types share a topic,
each under its own subject (topic-record-name strategy: ``<topic>-<record full name>``).

Decoding reads with the writer's schema (found by id in the registry) resolved against
the catalog's current schema: old records gain new fields' defaults and lose dropped
ones, which is exactly what BACKWARD compatibility promises.
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from events.schema.catalog import Catalog, canonical_json, full_name
from events.errors import DecodeError, SchemaError
from events.schema.registry import SchemaRegistry
from events.privacy.policy import Policy, policy_of
from events.schema.validation import Validator

MAGIC_BYTE = 0
_HEADER = struct.Struct(">BI")


@dataclass(frozen=True)
class EncodedValue:
    schema_id: int
    event_type: str
    value: bytes


@dataclass(frozen=True)
class DecodedValue:
    schema_id: int
    event_type: str
    datum: dict[str, Any]
    policy: Policy  #: the privacy policy of the schema the value was written with


def subject_name(topic: str, event_type: str) -> str:
    """The registry subject of an event type on a topic (topic-record-name strategy)."""
    return f"{topic}-{event_type}"


def encode_value(schema_id: int, parsed_schema: Any, datum: Mapping[str, Any]) -> bytes:
    """Frame ``datum`` written with a fastavro-parsed schema under ``schema_id``."""
    out = io.BytesIO()
    out.write(_HEADER.pack(MAGIC_BYTE, schema_id))
    schemaless_writer(out, parsed_schema, datum)
    return out.getvalue()


def split_value(value: bytes) -> tuple[int, memoryview]:
    """The schema id and the Avro body of a framed value; DecodeError if it is not framed."""
    if len(value) < _HEADER.size:
        raise DecodeError(f"value of {len(value)} bytes is shorter than the {_HEADER.size}-byte wire-format header")
    magic, schema_id = _HEADER.unpack_from(value)
    if magic != MAGIC_BYTE:
        raise DecodeError(f"value starts with byte 0x{magic:02x}, not the wire-format magic byte 0x00")
    return schema_id, memoryview(value)[_HEADER.size:]


@dataclass(frozen=True)
class _WriterPlan:
    event_type: str
    schema: dict[str, Any]
    parsed: Any
    validator: Validator


@dataclass(frozen=True)
class _ReaderPlan:
    event_type: str
    writer: Any
    reader: Any
    policy: Policy


class Codec:
    """Encodes catalog events for one topic and decodes any registered value."""

    def __init__(self, registry: SchemaRegistry, catalog: Catalog, topic: str, *, registration: str = "auto") -> None:
        if registration not in ("auto", "explicit"):
            raise SchemaError(f"registration must be 'auto' or 'explicit', got {registration!r}")
        self.registry, self.catalog, self.topic = registry, catalog, topic
        self.registration = registration
        self._writers: dict[str, _WriterPlan] = {}
        self._ids: dict[str, int] = {}
        self._readers: dict[int, _ReaderPlan] = {}
        self._lock = threading.Lock()

    def subject(self, event_type: str) -> str:
        """The registry subject of an event type on this topic (topic-record-name strategy)."""
        return subject_name(self.topic, self.catalog.full_name(event_type))

    def encode(self, event_type: str, datum: Mapping[str, Any]) -> EncodedValue:
        """Validate ``datum`` (InvalidEvent names the bad field), then frame it; nothing is sent.

        ``datum`` is in wire form (personal fields already sealed). The wire schema is
        registered on first use, only once an event of that type is valid; with
        ``registration="explicit"`` it must have been registered before (``evp schemas
        register``), else SchemaError says so.
        """
        plan = self._writer_plan(event_type)
        plan.validator.validate(datum)
        schema_id = self._schema_id(plan)
        return EncodedValue(schema_id, plan.event_type, encode_value(schema_id, plan.parsed, datum))

    def _writer_plan(self, event_type: str) -> _WriterPlan:
        with self._lock:
            plan = self._writers.get(event_type)
            if plan is None:
                schema = self.catalog.wire_schema(event_type)
                name = full_name(schema)
                plan = _WriterPlan(name, schema, parse_schema(schema), Validator(name, schema))
                self._writers[event_type] = plan
            return plan

    def _schema_id(self, plan: _WriterPlan) -> int:
        with self._lock:
            schema_id = self._ids.get(plan.event_type)
            if schema_id is None:
                subject = self.subject(plan.event_type)
                if self.registration == "explicit":
                    found = self.registry.lookup(subject, plan.schema)
                    if found is None:
                        raise SchemaError(
                            f"the schema of {plan.event_type} is not registered under {subject!r} and this project "
                            "registers explicitly: run `evp schemas register` (after `evp check`)"
                        )
                    schema_id = found
                else:
                    schema_id = self.registry.register(subject, plan.schema)
                self._ids[plan.event_type] = schema_id
            return schema_id

    def decode(self, value: bytes) -> DecodedValue:
        """The event in ``value``.

        Anything wrong with the bytes raises DecodeError and nothing else, so a consumer
        can dead-letter exactly those records; only an unreachable registry log raises
        ServiceUnavailable, which is worth a retry rather than a dead letter.
        """
        schema_id, body = split_value(value)
        plan = self._reader_plan(schema_id)
        source = io.BytesIO(body)
        try:
            datum = schemaless_reader(source, plan.writer, plan.reader)
        except Exception as err:  # noqa: BLE001 - fastavro signals corrupt input in many ways
            raise DecodeError(f"schema id {schema_id} ({plan.event_type}): Avro body unreadable near byte "
                              f"{_HEADER.size + source.tell()}: {type(err).__name__}: {err}") from err
        if source.tell() != len(body):
            raise DecodeError(f"schema id {schema_id} ({plan.event_type}): {len(body) - source.tell()} "
                              f"unread bytes after the record at byte {_HEADER.size + source.tell()}")
        if not isinstance(datum, dict):
            raise DecodeError(f"schema id {schema_id} is not a record schema")
        return DecodedValue(schema_id, plan.event_type, datum, plan.policy)

    def policy(self, schema_id: int) -> Policy:
        """The privacy policy of the schema with this id (the writer's); DecodeError if unknown."""
        return self._reader_plan(schema_id).policy

    def _reader_plan(self, schema_id: int) -> _ReaderPlan:
        plan = self._readers.get(schema_id)  # plans are only ever added: a lock-free read is safe
        if plan is not None:
            return plan
        try:
            writer_schema = self.registry.get(schema_id).schema
        except SchemaError as err:
            raise DecodeError(f"schema id {schema_id} is not in the registry: {err}") from err
        plan = self._plan_reading(schema_id, writer_schema)
        with self._lock:
            return self._readers.setdefault(schema_id, plan)

    def _plan_reading(self, schema_id: int, writer_schema: dict[str, Any]) -> _ReaderPlan:
        """Read with the catalog's current schema where it knows the type, else as written."""
        try:
            name = full_name(writer_schema)
            writer = parse_schema(writer_schema)
            current = self.catalog.wire_schema(name) if name in self.catalog else writer_schema
            # Same schema both sides: no resolution step (fastavro is ~2x faster without one).
            reader = None if canonical_json(current) == canonical_json(writer_schema) else parse_schema(current)
            # The policy is the writer's: readers honour what the event was written under.
            return _ReaderPlan(event_type=name, writer=writer, reader=reader, policy=policy_of(writer_schema))
        except Exception as err:  # noqa: BLE001 - a registered schema that fastavro refuses
            raise DecodeError(f"schema id {schema_id}: writer schema unusable: {err}") from err
