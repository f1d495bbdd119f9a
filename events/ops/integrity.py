"""Was the log tampered with? Cross-check the two copies of every event.

Every event exists twice, written by different systems: the ledger row in PostgreSQL and
the record on Kafka. :func:`verify_log` reads the topic up to its current end and compares
record by record — value bytes, event id, stream and version — and checks that every
stream's versions in the ledger are gap-free. Changing an event now means changing both
copies consistently, in two systems with separate access control.

Findings (each names the event or record):

- ``altered``: the topic's bytes for an event differ from the ledger's, or its record
  carries another stream version in its header (the one consumers dedupe on) or another
  ledger position (two events reordered in the ledger keep their bytes, streams and links);
- ``forged``: a record on the topic that the ledger never appended (unknown event id, or
  an id recorded under another stream or version);
- ``missing``: a published event (the ledger holds its offset) that the topic no longer has;
- ``truncated``: a partition that ends before offsets the ledger recorded for published
  events (the topic was deleted and made again, or its records were deleted): one finding
  per partition, with how many events are gone;
- ``corrupt``: a range of offsets whose record batch fails its CRC check (a damaged
  segment); the read steps past it and goes on, and the events in it are not reported
  again as missing;
- ``chain``: a record whose link in its partition's hash chain does not follow the record
  before it (:mod:`events.store.chain`): a record was removed, inserted or moved before it,
  or it was changed together with its ledger copy; one finding per break;
- ``unchained``: a record without a link after its partition's chain began (written to the
  topic by something other than a relay);
- ``checkpoint``: a signed checkpoint whose signature does not verify (with the auditor's
  public key given);
- ``rewritten``: a signed head whose offset holds a record with another link: the history
  up to it was changed, even if consistently in both copies;
- ``gap``: a stream whose ledger versions are not 1..n.

Every finding is reported and the check goes on after it.

Events still in the outbox are not expected on the topic yet; relay re-sends (the same
bytes twice) are not findings.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from events.store.client import EventStore
from events.event import HEADER_EVENT_ID, HEADER_OCCURRED_AT, RecordedEvent, kafka_headers
from events.gc_pause import gc_paused
from events.store.ledger import EVENT_COLUMNS, row_to_event
from events.ops.checkpoints import Checkpoint, gather, unmet_heads, watched_offsets
from events.store import chain
from events.store.chain import link_header
from events.store.log import Corrupt, end_offsets, read_pinned


@dataclass(frozen=True)
class Finding:
    kind: str  #: altered, forged, missing, truncated, corrupt, chain, unchained or gap
    detail: str


@dataclass
class IntegrityReport:
    records_read: int = 0
    events_checked: int = 0
    checkpoints_checked: int = 0  #: signed checkpoints whose signature verified
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
        signed = f", {self.checkpoints_checked} signed checkpoint(s) reached" if self.checkpoints_checked else ""
        return "\n".join([*lines, f"{self.events_checked} events, {self.records_read} records{signed}: {self.verdict}"])


def _absent(ledger: Mapping[uuid.UUID, RecordedEvent], seen: set[uuid.UUID], ends: Mapping[int, int],
            corrupt: list[Corrupt]) -> list[Finding]:
    """Published events the topic did not show: ``missing`` each, or ``truncated`` per partition
    when they lie at or past its end; those in a corrupt range are already reported."""
    findings: list[Finding] = []
    beyond: dict[int, list[RecordedEvent]] = {}
    for event_id, event in ledger.items():
        if event_id in seen or event.offset is None:
            continue
        if event.offset >= ends.get(event.partition, 0):
            beyond.setdefault(event.partition, []).append(event)
        elif not any(c.partition == event.partition and c.start <= event.offset < c.end for c in corrupt):
            findings.append(Finding("missing", f"event {event_id} ({event.stream_id} v{event.version}) was "
                                               f"published at {event.partition}@{event.offset} but is not on the topic intact"))
    for partition, gone in sorted(beyond.items()):
        first = min(gone, key=lambda e: e.offset or 0)
        findings.append(Finding("truncated", f"partition {partition} ends at offset {ends.get(partition, 0)}, "
                                             f"but the ledger recorded {len(gone)} published event(s) at or after it "
                                             f"(first: {first.event_id}, {first.stream_id} v{first.version} at offset "
                                             f"{first.offset})"))
    return findings


def _header_differs(headers: dict[str, bytes], event: RecordedEvent) -> str | None:
    """What the record's evp headers say that the ledger's row does not (None when they agree).

    Every header the relay writes from the row is compared: the type, the stream version
    (what consumers dedupe on), who did it, when, and the ledger position; the time as an
    instant (its text depends on the publishing session's time zone).
    """
    for name, expected in kafka_headers(event):
        found = headers.get(name)
        if name == HEADER_OCCURRED_AT:
            expected = event.occurred_at.astimezone(UTC).isoformat().encode()  # one text in every time zone
            try:
                if found is not None and datetime.fromisoformat(found.decode()) == event.occurred_at:
                    continue
            except (ValueError, UnicodeDecodeError):
                pass
        elif found == expected:
            continue
        return f"carries {name} header {found!r}, the ledger records {expected.decode()!r}"
    return None


def _checkpoint_findings(checkpoints: list[Checkpoint], valid: list[Checkpoint], only_witnessed: set[str],
                         links_at: Mapping[tuple[int, int], bytes], ends: Mapping[int, int]) -> list[Finding]:
    findings: list[Finding] = []
    for checkpoint in checkpoints:
        name = f"checkpoint {checkpoint.id} (made at {checkpoint.made_at})"
        if checkpoint not in valid:
            findings.append(Finding("checkpoint", f"{name}: its signature does not verify with the audit public key "
                                                  "(forged, or signed with another key)"))
            continue
        if checkpoint.id in only_witnessed:
            findings.append(Finding("missing", f"{name} is in the witness folder but not in the log"))
        for partition, head, kind, why in unmet_heads(checkpoint, links_at, ends):
            findings.append(Finding(kind, f"partition {partition} offset {head.offset}, signed by {name}: {why}"))
    return findings


class _Chains:
    """Each partition's chain followed (:class:`events.store.chain.Walk`), and the links at signed heads."""

    def __init__(self, watched: Mapping[int, set[int]] | None = None) -> None:
        self.walk = chain.Walk()
        self.watched = watched or {}  #: partition -> offsets whose link a checkpoint signed
        self.links_at: dict[tuple[int, int], bytes] = {}  #: (partition, offset) -> the link found there

    def check(self, message: Any, where: str) -> list[Finding]:
        """The findings for one record: a link that does not follow, or no link once the chain began."""
        found, claimed, _ = self.walk.step(message.partition, message.key, message.value, message.headers or [])
        if claimed is not None and message.offset in self.watched.get(message.partition, ()):
            self.links_at[(message.partition, message.offset)] = claimed
        if found == chain.UNCHAINED:
            return [Finding("unchained", f"{where}: a record without a chain link after the partition's chain "
                                         "began (it was not published by a relay)")]
        if found == chain.BROKEN:
            return [Finding("chain", f"{where}: its chain link does not follow the previous record's (a record "
                                     "before it was removed, inserted or moved, or this one was changed)")]
        return []


def verify_log(store: EventStore, progress: Callable[[int], None] | None = None, *,
               public_key: Ed25519PublicKey | None = None, witness: Path | None = None) -> IntegrityReport:
    """Compare the topic with the ledger; see the module docstring for what is reported.

    With the auditor's ``public_key``, the signed checkpoints (of the log, and of the
    ``witness`` folder) are checked too: each must verify, each witnessed one must be in
    the log, and each one's heads must be on the topic (:mod:`events.ops.checkpoints`).
    """
    with gc_paused():  # it holds every event of the ledger at once
        return _verify(store, progress, public_key, witness)


def _verify(store: EventStore, progress: Callable[[int], None] | None, public_key: Ed25519PublicKey | None,
            witness: Path | None) -> IntegrityReport:
    settings = store.settings
    conn = store.ledger.connection
    ranges = {p: (0, end) for p, end in end_offsets(settings, settings.events_topic).items()}
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS}, chain FROM evp_event_log WHERE position NOT IN (SELECT position FROM evp_outbox)"
    ).fetchall()
    ledger = {event.event_id: event for event in (row_to_event(r[:-1]) for r in rows)}
    links = {r[3]: bytes(r[-1]) for r in rows if r[-1] is not None}  #: event id -> the link the ledger recorded
    report = IntegrityReport(events_checked=len(ledger))
    seen: set[uuid.UUID] = set()
    corrupt: list[Corrupt] = []
    checkpoints, only_witnessed = gather(store, witness) if public_key is not None else ([], set())
    valid = [c for c in checkpoints if public_key is not None and c.valid(public_key)]
    chains = _Chains(watched_offsets(valid))

    def on_corrupt(found: Corrupt) -> None:
        corrupt.append(found)
        chains.walk.resync(found.partition)

    for message in read_pinned(settings, settings.events_topic, ranges, on_corrupt=on_corrupt):
        report.records_read += 1
        if progress:
            progress(1)
        where = f"partition {message.partition} offset {message.offset}"
        report.findings.extend(chains.check(message, where))
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
        elif (differs := _header_differs(headers, event)) is not None:
            report.findings.append(Finding("altered", f"{where}: event {event_id} ({event.stream_id} v{event.version}) "
                                                      f"{differs}"))
            seen.add(event_id)
        elif message.offset == event.offset and event_id in links and link_header(message.headers or []) != links[event_id]:
            report.findings.append(Finding("altered", f"{where}: event {event_id} ({event.stream_id} v{event.version}) "
                                                      "carries another chain link than the ledger recorded"))
            seen.add(event_id)
        else:
            seen.add(event_id)
    report.findings.extend(
        Finding("corrupt", f"partition {c.partition} offsets {c.start}..{c.end - 1}: unreadable ({c.reason})") for c in corrupt)
    ends = {p: end for p, (_, end) in ranges.items()}
    report.checkpoints_checked = len(valid)
    report.findings.extend(_checkpoint_findings(checkpoints, valid, only_witnessed, chains.links_at, ends))
    report.findings.extend(_absent(ledger, seen, ends, corrupt))
    gaps = conn.execute(
        "SELECT stream_id, count(*), max(version) FROM evp_events GROUP BY stream_id HAVING count(*) <> max(version)"
    ).fetchall()
    report.findings.extend(Finding("gap", f"stream {s!r} has {n} events but reaches version {v}") for s, n, v in gaps)
    return report
