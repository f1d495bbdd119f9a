"""The producer SDK: validate, encrypt, encode, append with consistency, publish.

``append`` is what producers call. It never talks to Kafka directly: it writes the ledger
and the outbox in one PostgreSQL transaction (see :mod:`events.store.ledger`), and the relay
publishes. ``flush`` publishes inline, so a script needs no separate relay process; a
service runs ``evp relay run`` instead and uses ``flush`` only to wait.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from events.adapters import postgres
from events.schema.catalog import Catalog
from events.schema.codec import Codec
from events.errors import InvalidEvent
from events.event import ANY, AppendResult, EncodedEvent, Event, ExpectedVersion, RecordedEvent
from events.adapters.kafka import ensure_event_topics
from events.privacy.kek import kek_from_settings
from events.privacy.keyring import Keyring, PostgresKeyStore
from events.store.ledger import Ledger, Reservation
from events.privacy.personal import PersonalData, blind_index
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.store.relay import Relay, drain
from events.settings import Settings
from events.schema.validation import Validator

BLIND_INDEX_OF = "evp.blind_index_of"


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True)
class StoredEvent:
    """A recorded event, decoded and (where the keyring allows) decrypted."""

    record: RecordedEvent
    data: Mapping[str, Any]

    @property
    def type(self) -> str:
        return self.record.event_type


class EventStore:
    """One producer: a ledger connection, a schema registry, a keyring and a relay."""

    def __init__(
        self, settings: Settings, conn: psycopg.Connection, codec: Codec, catalog: Catalog, keyring: Keyring,
        resources: Sequence[Closeable] = (),
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.codec = codec
        self.keyring = keyring
        self.personal = PersonalData(catalog)
        self._conn = conn
        self.ledger = Ledger(conn, settings.partitions)
        self._relay: Relay | None = None
        self._plans: dict[str, tuple[Mapping[str, Any], Validator]] = {}
        self._resources = list(resources)  # closed with the store

    @classmethod
    def open(cls, settings: Settings) -> EventStore:
        """Connect to both services, apply migrations and create topics (all idempotent)."""
        conn = postgres.connect(settings.database_url, autocommit=True)
        postgres.migrate(conn)
        ensure_event_topics(settings)
        catalog = Catalog.default()
        schema_log = KafkaSchemaLog(settings.kafka, settings.schemas_topic)
        keys = PostgresKeyStore(settings.database_url)
        keys.ensure_schema()
        keyring = Keyring(keys, kek_from_settings(settings))
        codec = Codec(SchemaRegistry(schema_log), catalog, settings.events_topic)
        return cls(settings, conn, codec, catalog, keyring, resources=(schema_log, keys))

    # -- writing ------------------------------------------------------------------------
    def prepare(self, event: Event) -> EncodedEvent:
        """Validate, fill blind indexes, encrypt personal fields and encode: before anything is sent."""
        full_name = self.catalog.full_name(event.type)
        schema, validator = self._plan(full_name)
        data = self._with_blind_indexes(full_name, schema, event.data)
        validator.validate(data)  # before encryption, so errors name plaintext fields
        sealed = self.personal.seal(full_name, str(event.event_id), data, self.keyring)
        encoded = self.codec.encode(full_name, sealed)
        subject_field = self.catalog.subject_field(full_name)
        subject = data.get(subject_field) if subject_field else None
        return EncodedEvent(
            event.event_id, full_name, encoded.schema_id, encoded.value, event.actor, event.occurred_at, subject
        )

    def _plan(self, full_name: str) -> tuple[Mapping[str, Any], Validator]:
        plan = self._plans.get(full_name)
        if plan is None:
            schema = self.catalog.schema(full_name)
            plan = self._plans[full_name] = (schema, Validator(full_name, schema))
        return plan

    def _with_blind_indexes(self, event_type: str, schema: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        filled = dict(data)
        for field in schema["fields"]:
            source = field.get(BLIND_INDEX_OF)
            if source is None:
                continue
            if field["name"] in filled:
                raise InvalidEvent(event_type, field["name"], f"is computed from {source!r} by the SDK; do not set it")
            value = filled.get(source)
            if not isinstance(value, str):
                raise InvalidEvent(event_type, source, "must be a string (it feeds a blind index)")
            filled[field["name"]] = blind_index(self.keyring, source, value)
        return filled

    def append(
        self,
        stream_id: str,
        events: Event | Sequence[Event],
        expected_version: ExpectedVersion = ANY,
        *,
        reservations: Sequence[Reservation] = (),
    ) -> AppendResult:
        """Append one event or a batch atomically; see :class:`events.store.ledger.Ledger` for the contract."""
        batch = [events] if isinstance(events, Event) else list(events)
        encoded = [self.prepare(e) for e in batch]
        return self.ledger.append(stream_id, encoded, expected_version, reservations)

    def flush(self, timeout: float = 60.0) -> int:
        """Publish the outbox to Kafka now; returns how many events this call sent.

        The leases taken to publish are handed back afterwards: kept, they would stop a
        running ``evp relay run`` from publishing those partitions until the next flush.
        """
        if self._relay is None:
            s = self.settings
            self._relay = Relay(s.database_url, s.kafka, s.events_topic, s.partitions)
        try:
            return drain(self._relay, timeout=timeout)
        finally:
            self._relay.release_leases()

    def reserve_email(self, email: str) -> Reservation:
        """A reservation that keeps one stream per email, checked on the blind index."""
        return Reservation("email", blind_index(self.keyring, "email", email))

    # -- reading ------------------------------------------------------------------------
    def decode(self, record: RecordedEvent, *, decrypt: bool = True) -> StoredEvent:
        decoded = self.codec.decode(record.value)
        data = decoded.datum
        if decrypt:
            data = self.personal.open(decoded.event_type, str(record.event_id), data, self.keyring)
        return StoredEvent(record, data)

    def read_stream(self, stream_id: str, *, decrypt: bool = True) -> list[StoredEvent]:
        return [self.decode(r, decrypt=decrypt) for r in self.ledger.read_stream(stream_id)]

    def close(self) -> None:
        if self._relay is not None:
            self._relay.close()
        for resource in self._resources:
            resource.close()
        self._conn.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
