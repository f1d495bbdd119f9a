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
from events.project import find_project
from events.schema.catalog import Catalog
from events.schema.codec import Codec
from events.errors import InvalidEvent
from events.event import ANY, AppendResult, EncodedEvent, Event, ExpectedVersion, RecordedEvent, Reservation
from events.adapters.kafka import ensure_event_topics
from events.privacy.kek import kek_finder, kek_from_settings
from events.privacy.keyring import Keyring, PostgresKeyStore
from events.store.log import LogRecord
from events.store.ledger import Ledger
from events.privacy import personal
from events.privacy.personal import blind_index
from events.privacy.policy import Policy
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.store.relay import Relay, drain
from events.settings import Settings
from events.schema.validation import Validator


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
        self._conn = conn
        self.ledger = Ledger(conn, settings.partitions)
        self._relay: Relay | None = None
        self._plans: dict[str, tuple[Policy, Validator]] = {}
        self._resources = list(resources)  # closed with the store

    @classmethod
    def open(cls, settings: Settings, catalog: Catalog | None = None, *, registration: str | None = None) -> EventStore:
        """Connect to both services, apply migrations and create topics (all idempotent).

        ``catalog`` defaults to the platform's event types plus the project's, and
        ``registration`` to the project's (``auto`` without a project); see
        :mod:`events.project`.
        """
        project = find_project(settings) if catalog is None or registration is None else None
        conn = postgres.connect(settings.database_url, autocommit=True)
        postgres.migrate(conn)
        ensure_event_topics(settings)
        if catalog is None:
            catalog = Catalog.platform() if project is None else project.catalog()
        if registration is None:
            registration = "auto" if project is None else project.registration
        schema_log = KafkaSchemaLog(settings)
        keys = PostgresKeyStore(settings.keyring_url)
        keys.ensure_schema()
        # find_kek: a process started before `evp keys rotate` follows it to the new KEK.
        keyring = Keyring(keys, kek_from_settings(settings), find_kek=kek_finder(settings))
        codec = Codec(SchemaRegistry(schema_log), catalog, settings.events_topic, registration=registration)
        return cls(settings, conn, codec, catalog, keyring, resources=(schema_log, keys))

    # -- writing ------------------------------------------------------------------------
    def prepare(self, event: Event) -> EncodedEvent:
        """Turn an event into what the ledger stores; nothing is sent or written.

        1. validate the plaintext against the declared schema (errors name plaintext fields);
        2. fill blind-index fields and compute the unique reservations the schema declares
           (``evp.unique``), each held for the subject the value belongs to;
        3. seal every personal field under its own subject's key;
        4. encode with the wire schema (registering it, unless the project registers
           explicitly) and note every subject the event concerns.

        An event without an actor is recorded as done by ``Settings.actor`` (``EVP_ACTOR``).
        """
        full_name = self.catalog.full_name(event.type)
        policy, validator = self._plan(full_name)
        data = self._with_blind_indexes(policy, event.data)
        validator.validate(data)
        reservations = tuple(
            Reservation(unique.scope, blind_index(self.keyring, unique.scope, data[unique.name]),
                        None if unique.subject_field is None else data.get(unique.subject_field))
            for unique in policy.unique if data.get(unique.name) is not None
        )
        sealed = personal.seal(policy, str(event.event_id), data, self.keyring)
        encoded = self.codec.encode(full_name, sealed)
        subject = data.get(policy.subject_field) if policy.subject_field else None
        return EncodedEvent(
            event.event_id, full_name, encoded.schema_id, encoded.value, event.actor or self.settings.actor,
            event.occurred_at, subject if isinstance(subject, str) else None, policy.subjects(data), reservations,
        )

    def check(self, event: Event) -> None:
        """Validate ``event`` as :meth:`prepare` would, without sealing or encoding it; InvalidEvent names the field."""
        policy, validator = self._plan(self.catalog.full_name(event.type))
        validator.validate(self._with_blind_indexes(policy, event.data))

    def _plan(self, full_name: str) -> tuple[Policy, Validator]:
        plan = self._plans.get(full_name)
        if plan is None:
            plan = self._plans[full_name] = (self.catalog.policy(full_name),
                                             Validator(full_name, self.catalog.schema(full_name)))
        return plan

    def _with_blind_indexes(self, policy: Policy, data: Mapping[str, Any]) -> dict[str, Any]:
        filled = dict(data)
        for field, source in policy.blind_indexes:
            if field in filled:
                raise InvalidEvent(policy.event_type, field, f"is computed from {source!r} by the SDK; do not set it")
            value = filled.get(source)
            if not isinstance(value, str):
                raise InvalidEvent(policy.event_type, source, "must be a string (it feeds a blind index)")
            filled[field] = blind_index(self.keyring, source, value)
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
            self._relay = Relay(self.settings)
        try:
            return drain(self._relay, timeout=timeout)
        finally:
            self._relay.release_leases()

    # -- reading ------------------------------------------------------------------------
    def decode(self, record: RecordedEvent, *, decrypt: bool = True) -> StoredEvent:
        decoded = self.codec.decode(record.value)
        data = decoded.datum
        if decrypt:
            data = personal.open_fields(decoded.policy, str(record.event_id), data, self.keyring)
        return StoredEvent(record, data)

    def decrypt(self, record: LogRecord) -> dict[str, Any]:
        """The data of a record read from the topic, personal fields opened.

        A forgotten subject's personal fields read as :data:`events.privacy.personal.REDACTED`
        whatever their type; the rest of the record stays readable.
        """
        return personal.open_fields(self.codec.policy(record.schema_id), str(record.event_id), record.data, self.keyring)

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
