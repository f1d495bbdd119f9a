"""Was the log tampered with? Cross-check the two copies of every event.

Every event exists twice, written by different systems: the ledger row in PostgreSQL and
the record on Kafka. :func:`verify_log` reads the topic up to its current end and compares
record by record — value bytes, event id, stream and version — and checks that every
stream's versions in the ledger are gap-free. Changing an event now means changing both
copies consistently, in two systems with separate access control.

Findings (each names the event or record):

- ``altered``: the topic's bytes for an event differ from the ledger's, or its record
  carries another stream version in its header (the one consumers dedupe on);
- ``forged``: a record on the topic that the ledger never appended (unknown event id, or
  an id recorded under another stream or version);
- ``missing``: a published event (the ledger holds its offset) that the topic no longer has;
- ``truncated``: a partition that ends before offsets the ledger recorded for published
  events (the topic was deleted and made again, or its records were deleted): one finding
  per partition, with how many events are gone;
- ``corrupt``: a range of offsets whose record batch fails its CRC check (a damaged
  segment); the read steps past it and goes on, and the events in it are not reported
  again as missing;
- ``gap``: a stream whose ledger versions are not 1..n.

Every finding is reported and the check goes on after it.

Events still in the outbox are not expected on the topic yet; relay re-sends (the same
bytes twice) are not findings.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from events.store.client import EventStore
from events.event import HEADER_EVENT_ID, HEADER_STREAM_VERSION, RecordedEvent
from events.gc_pause import gc_paused
from events.store.ledger import EVENT_COLUMNS, row_to_event
from events.store.log import Corrupt, end_offsets, read_pinned


@dataclass(frozen=True)
class Finding:
    kind: str  #: altered, forged, missing, truncated, corrupt or gap
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
    corrupt: list[Corrupt] = []
    for message in read_pinned(settings, settings.events_topic, ranges, on_corrupt=corrupt.append):
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
        elif headers.get(HEADER_STREAM_VERSION) != str(event.version).encode():
            report.findings.append(Finding("altered", f"{where}: event {event_id} ({event.stream_id} v{event.version}) "
                                                      f"carries stream version header {headers.get(HEADER_STREAM_VERSION)!r}"))
            seen.add(event_id)
        else:
            seen.add(event_id)
    report.findings.extend(
        Finding("corrupt", f"partition {c.partition} offsets {c.start}..{c.end - 1}: unreadable ({c.reason})") for c in corrupt)
    beyond: dict[int, list[RecordedEvent]] = {}
    for event_id, event in ledger.items():
        if event_id in seen or event.offset is None:
            continue
        if event.offset >= ranges.get(event.partition, (0, 0))[1]:
            beyond.setdefault(event.partition, []).append(event)
        elif not any(c.partition == event.partition and c.start <= event.offset < c.end for c in corrupt):
            report.findings.append(Finding("missing", f"event {event_id} ({event.stream_id} v{event.version}) was "
                                                      f"published at {event.partition}@{event.offset} but is not on the topic intact"))
    for partition, gone in sorted(beyond.items()):
        first = min(gone, key=lambda e: e.offset or 0)
        report.findings.append(Finding("truncated", f"partition {partition} ends at offset {ranges.get(partition, (0, 0))[1]}, "
                                                    f"but the ledger recorded {len(gone)} published event(s) at or after it "
                                                    f"(first: {first.event_id}, {first.stream_id} v{first.version} at offset "
                                                    f"{first.offset})"))
    gaps = conn.execute(
        "SELECT stream_id, count(*), max(version) FROM evp_events GROUP BY stream_id HAVING count(*) <> max(version)"
    ).fetchall()
    report.findings.extend(Finding("gap", f"stream {s!r} has {n} events but reaches version {v}") for s, n, v in gaps)
    return report
