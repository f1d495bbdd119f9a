"""Audit queries: who did what, when, in order — answered from the ledger, never by a topic scan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from events.store.client import EventStore
from events.errors import CryptoError
from events.event import Event, RecordedEvent


@dataclass(frozen=True)
class AuditEntry:
    position: int
    stream_id: str
    version: int
    event_type: str
    event_id: str
    actor: str
    occurred_at: str
    recorded_at: str
    kafka: str
    data: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _entry(store: EventStore, record: RecordedEvent, decrypt: bool) -> AuditEntry:
    try:
        data = store.decode(record, decrypt=decrypt).data
    except CryptoError as err:  # tampered ciphertext: show the fact, not garbage
        data = {"error": str(err)}
    where = f"{record.partition}@{record.offset}" if record.offset is not None else f"{record.partition}@(unpublished)"
    return AuditEntry(
        position=record.position,
        stream_id=record.stream_id,
        version=record.version,
        event_type=record.event_type.rsplit(".", 1)[-1],
        event_id=str(record.event_id),
        actor=record.actor,
        occurred_at=record.occurred_at.isoformat(),
        recorded_at=record.recorded_at.isoformat(),
        kafka=where,
        data=data,
    )


def stream_history(store: EventStore, stream_id: str, *, decrypt: bool = False, position: int | None = None,
                   as_of: datetime | None = None) -> list[AuditEntry]:
    """Every event of one stream, in version order; with ``position`` or ``as_of``, only those
    it had then (:meth:`events.store.ledger.Ledger.read_stream_as_of`). The read itself is
    recorded (``AuditQueried``)."""
    records = (store.ledger.read_stream(stream_id) if position is None and as_of is None
               else store.ledger.read_stream_as_of(stream_id, position=position, time=as_of))
    entries = [_entry(store, r, decrypt) for r in records]
    _record_read(store, "stream", stream_id, None, decrypt, len(entries))
    return entries


def subject_history(store: EventStore, subject_id: str, *, decrypt: bool = False) -> list[AuditEntry]:
    """Every event that holds the subject's personal data, that the subject performed, or that
    audited them, in log order. The read itself is recorded (``AuditQueried``)."""
    entries = [_entry(store, r, decrypt) for r in store.ledger.events_concerning(subject_id)]
    _record_read(store, "subject", subject_id, subject_id, decrypt, len(entries))
    return entries


def _record_read(store: EventStore, query: str, target: str, subject_id: str | None, decrypted: bool, results: int) -> None:
    """Audit reads are events too: who looked, at what, and whether they decrypted it."""
    data = {"query": query, "target": target, "subject_id": subject_id, "decrypted": decrypted, "results": results}
    store.append(f"audit-reads-{query}", Event("AuditQueried", data, actor=store.settings.actor))


def summarize(data: Mapping[str, Any], width: int = 60) -> str:
    """A one-line view of an event's fields for the table output (long arrays elided)."""
    parts: list[str] = []
    for key, value in data.items():
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 4:
            value = f"[{len(value)} values]"
        parts.append(f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"
