"""The schema registry: every schema version ever written, with a global id, kept in a log.

It stores what Confluent's Schema Registry stores — subject, version, global id and
schema text — in a compacted Kafka topic, so that the wire format's schema id always
resolves, in this process or any other, now or in ten years. Only the part serializers
need is here (register, look up by id, latest of a subject); :mod:`events.schema.registry_http`
serves the same registry over the Confluent REST API (``evp registry serve``), so
third-party clients can read evp's topics.

There is no registry server to hand out ids, so the log itself is the arbiter. A
registrar appends a *claim* for the next free id and re-reads the log; every reader folds
the log in the same order with the same rules, so all agree on which claim won:

- the first claim for an id, in log order, owns that id; a later claim for it is ignored;
- a claim is accepted only if its version is exactly one past the subject's latest and
  its schema is not already registered under that subject (two registrars racing on one
  subject cannot both get "version 2", nor register one schema twice);
- every claimed id is used up, accepted or not, so the next free id is the highest seen + 1.

A registrar whose claim lost starts over (re-checking compatibility against the new
latest). Each claim has its own key (id plus a random token): compaction keeps the *last*
record per key, so keying by id alone would let a losing claim replace the winner.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import TopicPartition

from events.adapters import kafka

from events.schema.catalog import canonical_json
from events.schema.compatibility import check_backward
from events.errors import SchemaError, ServiceUnavailable
from events.settings import Settings

_log = logging.getLogger(__name__)

#: Lost races tolerated before register gives up; each loss means another registrar
#: made progress, so this only trips under pathological contention.
MAX_CLAIM_ATTEMPTS = 50


class SchemaLog(Protocol):
    """An append-only, totally ordered log of (key, value) records."""

    def append(self, key: bytes, value: bytes) -> None:
        """Append one record; it is durable and visible to read_all when this returns."""

    def read_all(self) -> list[tuple[bytes, bytes]]:
        """Every record, in log order."""


class MemorySchemaLog:
    """A log in memory, shared by the registries of one process (for tests and tools)."""

    def __init__(self) -> None:
        self._records: list[tuple[bytes, bytes]] = []
        self._lock = threading.Lock()

    def append(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._records.append((bytes(key), bytes(value)))

    def read_all(self) -> list[tuple[bytes, bytes]]:
        with self._lock:
            return list(self._records)


class KafkaSchemaLog:
    """The log as a single-partition compacted Kafka topic (created if missing).

    One partition gives the total order the id arbitration needs. Reads are incremental:
    records already read are kept, and each ``read_all`` fetches only up to the current
    end offset. Clients come from the Kafka adapter, so errors are translated there.
    """

    def __init__(self, settings: Settings, *, timeout_s: float = 15.0) -> None:
        self.bootstrap, self.topic = settings.kafka, settings.schemas_topic
        self._timeout_ms = int(timeout_s * 1000)
        self._partition = TopicPartition(self.topic, 0)
        self._lock = threading.Lock()
        self._records: list[tuple[bytes, bytes]] = []
        self._producer: Any = None
        self._consumer: Any = None
        kafka.ensure_topic(self.bootstrap, self.topic, 1, {"cleanup.policy": "compact"})

    def _timeouts(self) -> dict[str, Any]:
        return {"client_id": "evp-schema-registry", "bootstrap_timeout_ms": self._timeout_ms,
                "request_timeout_ms": self._timeout_ms}

    def append(self, key: bytes, value: bytes) -> None:
        with self._lock:
            if self._producer is None:
                self._producer = kafka.producer(self.bootstrap, linger_ms=0, max_block_ms=self._timeout_ms,
                                                delivery_timeout_ms=max(2 * self._timeout_ms, 30_000), **self._timeouts())
            with kafka.kafka_errors(self.bootstrap):
                future = self._producer.send(self.topic, key=key, value=value, partition=0)
                self._producer.flush(timeout=self._timeout_ms / 1000)
                future.get(timeout=self._timeout_ms / 1000)

    def read_all(self) -> list[tuple[bytes, bytes]]:
        with self._lock:
            if self._consumer is None:
                self._consumer = kafka.consumer(self.bootstrap, group_id=None, **self._timeouts())
                with kafka.kafka_errors(self.bootstrap):
                    self._consumer.assign([self._partition])
                    self._consumer.seek_to_beginning(self._partition)
            with kafka.kafka_errors(self.bootstrap):
                end = self._consumer.end_offsets([self._partition], timeout_ms=self._timeout_ms)[self._partition]
                while self._consumer.position(self._partition, timeout_ms=self._timeout_ms) < end:
                    batches = self._consumer.poll(timeout_ms=self._timeout_ms)
                    if not batches:
                        raise ServiceUnavailable("kafka", self.bootstrap,
                                                 f"no records from {self.topic!r} before offset {end}")
                    for records in batches.values():
                        self._records.extend((r.key or b"", r.value or b"") for r in records)
            return list(self._records)

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close()
                self._producer = None
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


@dataclass(frozen=True)
class RegisteredSchema:
    """One version of a subject, in the shape of Confluent's registry."""

    id: int
    subject: str
    version: int
    schema: dict[str, Any]


@dataclass
class _RegistryState:
    """The log folded by the arbitration rules; identical in every reader."""

    by_id: dict[int, RegisteredSchema] = field(default_factory=dict)
    versions: dict[str, list[RegisteredSchema]] = field(default_factory=dict)
    ids_by_schema: dict[tuple[str, str], int] = field(default_factory=dict)
    winning_keys: dict[int, bytes] = field(default_factory=dict)
    highest_id: int = 0
    applied: int = 0

    def apply(self, key: bytes, value: bytes) -> None:
        position, self.applied = self.applied, self.applied + 1
        try:
            entry, canonical = _decode_record(value)
        except SchemaError as err:
            # Skipped, not fatal: one foreign record must not stop every registrar for good.
            _log.warning("schema log record #%d ignored: %s", position, err)
            return
        self.highest_id = max(self.highest_id, entry.id)
        if entry.id in self.winning_keys:
            return
        self.winning_keys[entry.id] = key
        history = self.versions.setdefault(entry.subject, [])
        if entry.version != len(history) + 1 or (entry.subject, canonical) in self.ids_by_schema:
            return
        history.append(entry)
        self.by_id[entry.id] = entry
        self.ids_by_schema[(entry.subject, canonical)] = entry.id

    def accepted(self, schema_id: int, key: bytes) -> bool:
        return schema_id in self.by_id and self.winning_keys.get(schema_id) == key

    def latest(self, subject: str) -> RegisteredSchema | None:
        history = self.versions.get(subject)
        return history[-1] if history else None


def _decode_record(value: bytes) -> tuple[RegisteredSchema, str]:
    try:
        raw = json.loads(value)
        schema = json.loads(raw["schema"])
        entry = RegisteredSchema(id=int(raw["id"]), subject=str(raw["subject"]),
                                 version=int(raw["version"]), schema=schema)
        if entry.id < 1 or entry.version < 1:
            raise ValueError(f"id {entry.id} and version {entry.version} must be positive")
        return entry, canonical_json(schema)
    except (ValueError, KeyError, TypeError, SchemaError) as err:
        raise SchemaError(f"not a registry record: {err}") from err


def _encode_record(entry: RegisteredSchema) -> bytes:
    return json.dumps({
        "id": entry.id,
        "subject": entry.subject,
        "version": entry.version,
        "schema": json.dumps(entry.schema, sort_keys=True, separators=(",", ":")),
    }, sort_keys=True).encode()


class SchemaRegistry:
    """Registers schema versions under subjects and resolves global ids, over a SchemaLog."""

    def __init__(self, log: SchemaLog) -> None:
        self._log = log
        self._state = _RegistryState()
        self._lock = threading.RLock()

    def _refresh(self) -> _RegistryState:
        records = self._log.read_all()
        for key, value in records[self._state.applied:]:
            self._state.apply(key, value)
        return self._state

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """The id of ``schema`` under ``subject``, registering it as a new version if needed.

        A new version must be BACKWARD compatible with every version of the subject (it
        must read all of them: old events stay in the log); if it is not,
        IncompatibleSchema is raised naming the field, and nothing is written.
        """
        if not subject:
            raise SchemaError("a subject name must not be empty")
        canonical = canonical_json(schema)
        with self._lock:
            known = self._state.ids_by_schema.get((subject, canonical))
            if known is not None:
                return known
            for _ in range(MAX_CLAIM_ATTEMPTS):
                state = self._refresh()
                known = state.ids_by_schema.get((subject, canonical))
                if known is not None:
                    return known
                latest = state.latest(subject)
                for version in state.versions.get(subject, ()):
                    check_backward(subject, schema, version.schema)
                claim = RegisteredSchema(id=state.highest_id + 1, subject=subject,
                                         version=1 if latest is None else latest.version + 1, schema=schema)
                key = json.dumps({"id": claim.id, "claim": uuid.uuid4().hex}, sort_keys=True).encode()
                self._log.append(key, _encode_record(claim))
                if self._refresh().accepted(claim.id, key):
                    return claim.id
        raise SchemaError(f"could not register a schema under {subject!r}: "
                          f"lost {MAX_CLAIM_ATTEMPTS} races for an id to other registrars")

    def lookup(self, subject: str, schema: dict[str, Any]) -> int | None:
        """The id of ``schema`` under ``subject`` if it is registered there, else None; never writes."""
        canonical = canonical_json(schema)
        with self._lock:
            known = self._state.ids_by_schema.get((subject, canonical))
            return known if known is not None else self._refresh().ids_by_schema.get((subject, canonical))

    def get(self, schema_id: int) -> RegisteredSchema:
        """The schema with this global id; re-reads the log once if it is not known yet."""
        with self._lock:
            found = self._state.by_id.get(schema_id) or self._refresh().by_id.get(schema_id)
        if found is None:
            raise SchemaError(f"schema id {schema_id} is not registered")
        return found

    def latest(self, subject: str) -> RegisteredSchema | None:
        """The newest version under ``subject``, or None if it has none."""
        with self._lock:
            return self._refresh().latest(subject)

    def versions(self, subject: str) -> tuple[RegisteredSchema, ...]:
        """Every version under ``subject``, oldest first."""
        with self._lock:
            return tuple(self._refresh().versions.get(subject, ()))

    def subjects(self) -> tuple[str, ...]:
        """Every subject with at least one version, sorted (a lost claim leaves none)."""
        with self._lock:
            return tuple(sorted(s for s, history in self._refresh().versions.items() if history))
