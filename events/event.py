"""What callers append, and what the log hands back."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from events.ids import uuid7


class StreamState(Enum):
    """Expected versions that are not a number."""

    ANY = "any"  #: append whatever the stream's version
    NO_STREAM = "no stream"  #: the stream must not exist yet

    def __str__(self) -> str:
        return self.value


ANY = StreamState.ANY
NO_STREAM = StreamState.NO_STREAM
ExpectedVersion = int | StreamState


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Event:
    """One event to append. ``event_id`` doubles as the idempotency key."""

    type: str
    data: Mapping[str, Any]
    event_id: uuid.UUID = field(default_factory=uuid7)
    actor: str = ""
    occurred_at: datetime = field(default_factory=_now)


@dataclass(frozen=True)
class Reservation:
    """A claim that ``value`` (a blind index) is unique within ``scope``, held for ``subject_id``."""

    scope: str
    value: str
    subject_id: str | None = None


@dataclass(frozen=True)
class EncodedEvent:
    """An event after validation, encryption and Avro encoding: ready for the ledger.

    ``subject_id`` is the record's own subject; ``subject_ids`` every subject whose data it
    holds; ``reservations`` the unique values its schema declares (claimed with the append).
    """

    event_id: uuid.UUID
    event_type: str
    schema_id: int
    value: bytes
    actor: str
    occurred_at: datetime
    subject_id: str | None = None
    subject_ids: tuple[str, ...] = ()
    reservations: tuple[Reservation, ...] = ()


@dataclass(frozen=True)
class RecordedEvent:
    """An event as the ledger stores it: its place in its stream and in the global order."""

    position: int
    stream_id: str
    version: int
    event_id: uuid.UUID
    event_type: str
    schema_id: int
    value: bytes
    actor: str
    occurred_at: datetime
    recorded_at: datetime
    partition: int
    offset: int | None


@dataclass(frozen=True)
class AppendResult:
    """Where an append landed. ``duplicate`` is true when every event id was already there."""

    stream_id: str
    first_version: int
    last_version: int
    positions: tuple[int, ...]
    duplicate: bool = False


HEADER_EVENT_ID = "evp.event_id"
HEADER_EVENT_TYPE = "evp.event_type"
HEADER_STREAM_VERSION = "evp.stream_version"
HEADER_OCCURRED_AT = "evp.occurred_at"
HEADER_ACTOR = "evp.actor"
HEADER_POSITION = "evp.position"


def kafka_headers(event: RecordedEvent) -> list[tuple[str, bytes]]:
    """Headers every evp record carries, so consumers can dedupe and audit without decoding."""
    return [
        (HEADER_EVENT_ID, str(event.event_id).encode()),
        (HEADER_EVENT_TYPE, event.event_type.encode()),
        (HEADER_STREAM_VERSION, str(event.version).encode()),
        (HEADER_OCCURRED_AT, event.occurred_at.isoformat().encode()),
        (HEADER_ACTOR, event.actor.encode()),
        (HEADER_POSITION, str(event.position).encode()),
    ]
