"""Forgetting a data subject: crypto-shredding, recorded as an event.

Personal data is only ever stored encrypted under the subject's own data key, so deleting
that key makes every copy unreadable at once — the Kafka log, the ledger, views, snapshots
and backups — without rewriting any of them. What stays readable is what was never
personal: features, labels, counts, pseudonymous ids.

Contract of :func:`forget_subject`:

1. find what the erasure touches (streams, events, reservations, snapshots, training runs);
2. unless ``dry_run``: destroy the data key (a tombstone remains, so the subject cannot be
   silently re-keyed), release the subject's unique reservations and only theirs (their
   blind indexes would otherwise let a key holder test guesses of the values; another
   person's reservation on the same stream stays), and append a ``SubjectForgotten``
   event, which carries no personal data and tells projections to redact their rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.store.client import EventStore
from events.errors import EvpError
from events.event import Event, RecordedEvent


@dataclass(frozen=True)
class ErasureReport:
    subject_id: str
    dry_run: bool
    streams: tuple[str, ...]
    events: int
    reservations: int
    snapshots: tuple[str, ...] = field(default=())
    key_destroyed: bool = False
    published: bool = False  #: the SubjectForgotten event is on Kafka (else it waits in the outbox)

    def __str__(self) -> str:
        verb = "would touch" if self.dry_run else "touched"
        key = "" if self.dry_run else ("; data key destroyed" if self.key_destroyed else "; no live data key was left")
        if not self.dry_run and not self.published:
            key += "; erasure recorded, its publication to Kafka is pending (the relay will send it)"
        return (f"erasure of {self.subject_id} {verb} {self.events} events in {len(self.streams)} streams, "
                f"{self.reservations} reservations, {len(self.snapshots)} snapshots{key}")


def erasure_scope(store: EventStore, subject_id: str) -> ErasureReport:
    events = store.ledger.events_concerning(subject_id)
    streams = tuple(sorted({e.stream_id for e in events}))
    reservations = store.ledger.reservations_of(subject_id)
    return ErasureReport(subject_id, True, streams, len(events), reservations, _snapshots_holding(store, events))


def _snapshots_holding(store: EventStore, events: list[RecordedEvent]) -> tuple[str, ...]:
    """Snapshots whose pinned ranges include any of the subject's events."""
    placed = [(e.partition, e.offset) for e in events if e.offset is not None]
    found = []
    for stream in store.ledger.streams_with_prefix("snapshot-"):
        data = store.read_stream(stream, decrypt=False)[0].data
        ranges = {r["partition"]: (r["start"], r["end"]) for r in data["ranges"]}
        if any(p in ranges and ranges[p][0] <= o < ranges[p][1] for p, o in placed):
            found.append(str(data["snapshot_id"]))
    return tuple(found)


def forget_subject(
    store: EventStore, subject_id: str, *, reason: str, dry_run: bool = False, actor: str | None = None
) -> ErasureReport:
    scope = erasure_scope(store, subject_id)
    if dry_run:
        return scope
    destroyed = store.keyring.forget(subject_id)
    store.ledger.release_subject(subject_id)
    erasure = Event("SubjectForgotten", {"subject_id": subject_id, "reason": reason}, actor=actor or store.settings.actor)
    store.append(f"erasure-{subject_id}", erasure)
    try:
        store.flush()
        published = True
    except EvpError:  # the key is gone and the event is in the outbox: the erasure stands
        published = False
    return ErasureReport(subject_id, False, scope.streams, scope.events, scope.reservations, scope.snapshots,
                         destroyed, published)
