"""Was the log tampered with? Cross-check the two copies of every event.

Every event exists twice, written by different systems: the ledger row in PostgreSQL and
the record on Kafka. :func:`verify_log` reads the topic up to its current end and compares
record by record — value bytes, event id, stream and version — and checks that every
stream's versions in the ledger are gap-free. Changing an event now means changing both
copies consistently, in two systems with separate access control.

Findings (each names the event or record):

- ``altered``: the topic's bytes for an event differ from the ledger's;
- ``forged``: a record on the topic that the ledger never appended (unknown event id, or
  an id recorded under another stream or version);
- ``missing``: a published event (the ledger holds its offset) that the topic no longer has;
- ``gap``: a stream whose ledger versions are not 1..n.

Events still in the outbox are not expected on the topic yet; relay re-sends (the same
bytes twice) are not findings.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from events.store.client import EventStore
from events.event import HEADER_EVENT_ID
from events.gc_pause import gc_paused
from events.store.ledger import EVENT_COLUMNS, row_to_event
from events.store.log import end_offsets, read_pinned


@dataclass(frozen=True)
class Finding:
    kind: str  #: altered, forged, missing or gap
    detail: str


@dataclass
class IntegrityReport:
    records_read: int = 0
    events_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.findings

    @property
    def verdict(self) -> str:
        return "intact" if self.intact else "NOT intact"

    def __str__(self) -> str:
        """One line per finding, then ``N events, M records: intact`` (or ``NOT intact``)."""
        lines = [f"{f.kind}: {f.detail}" for f in self.findings]
        return "\n".join([*lines, f"{self.events_checked} events, {self.records_read} records: {self.verdict}"])


def verify_log(store: EventStore, progress: Callable[[int], None] | None = None) -> IntegrityReport:
    """Compare the topic with the ledger; see the module docstring for what is reported."""
    with gc_paused():  # it holds every event of the ledger at once
        return _verify(store, progress)


def _verify(store: EventStore, progress: Callable[[int], None] | None) -> IntegrityReport:
    settings = store.settings
    conn = store.ledger.connection
    ranges = {p: (0, end) for p, end in end_offsets(settings, settings.events_topic).items()}
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM evp_event_log WHERE position NOT IN (SELECT position FROM evp_outbox)"
    ).fetchall()
    ledger = {event.event_id: event for event in map(row_to_event, rows)}
    report = IntegrityReport(events_checked=len(ledger))
    seen: set[uuid.UUID] = set()
    for message in read_pinned(settings, settings.events_topic, ranges):
        report.records_read += 1
        if progress:
            progress(1)
        where = f"partition {message.partition} offset {message.offset}"
        headers = dict(message.headers or [])
        try:
            event_id = uuid.UUID(headers[HEADER_EVENT_ID].decode())
        except (KeyError, ValueError, UnicodeDecodeError):
            report.findings.append(Finding("forged", f"{where}: no valid event id header"))
            continue
        event = ledger.get(event_id)
        key = (message.key or b"").decode("utf-8", errors="replace")
        if event is None or event.stream_id != key:
            report.findings.append(Finding("forged", f"{where}: event {event_id} of stream {key!r} is not in the ledger"))
        elif bytes(message.value or b"") != event.value:
            report.findings.append(Finding("altered", f"{where}: event {event_id} ({event.stream_id} v{event.version}) "
                                                      "differs from the ledger's bytes"))
            seen.add(event_id)  # reported once, as altered
        else:
            seen.add(event_id)
    for event_id, event in ledger.items():
        if event_id not in seen and event.offset is not None and event.offset < ranges.get(event.partition, (0, 0))[1]:
            report.findings.append(Finding("missing", f"event {event_id} ({event.stream_id} v{event.version}) was "
                                                      f"published at {event.partition}@{event.offset} but is not on the topic intact"))
    gaps = conn.execute(
        "SELECT stream_id, count(*), max(version) FROM evp_events GROUP BY stream_id HAVING count(*) <> max(version)"
    ).fetchall()
    report.findings.extend(Finding("gap", f"stream {s!r} has {n} events but reaches version {v}") for s, n, v in gaps)
    return report
