"""Doing to the events topic what an attacker or an accident would.

Deleting it and making it again; filling it again with records of one's choosing (left out,
reordered, changed, even rechained as whoever writes the topic could, without the audit key)
and making the ledger agree; spoiling record batches in the broker's own segment files.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from events.adapters.kafka import admin, ensure_event_topics, producer
from events.errors import EvpError
from events.event import HEADER_POSITION
from events.settings import Settings
from events.store.chain import GENESIS, HEADER_CHAIN, link, link_header, record_digest
from events.store.log import end_offsets, read_pinned
from events.store.source import Message
from tests.support.plaintext import kafka_segments


def recreate_events_topic(settings: Settings, timeout: float = 30.0) -> None:
    """Delete the settings' events topic and make it again, empty (deletion is asynchronous in the broker)."""
    client = admin(settings)
    try:
        client.delete_topics([settings.events_topic])
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while True:
        try:
            ensure_event_topics(settings)
            return
        except EvpError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# -- the topic's records, and the topic made again from chosen ones ------------------------------
def topic_records(settings: Settings) -> dict[int, list[Message]]:
    """Every record of the events topic, per non-empty partition, in offset order."""
    topic = settings.events_topic
    return {p: [Message(topic, m.partition, m.offset, m.key, m.value, tuple(m.headers or ()))
                for m in read_pinned(settings, topic, {p: (0, end)})]
            for p, end in sorted(end_offsets(settings, topic).items()) if end}


def republish(settings: Settings, records: Mapping[int, Sequence[Message]], *,
              rechain: bool = False) -> dict[int, list[Message]]:
    """Make the events topic again holding exactly ``records``, each partition's in the order given.

    1. the topic is deleted and made again, empty;
    2. each record is sent to its partition with its key, value and headers; with ``rechain``
       its chain link is first computed again, from the chain's start over the records as given
       (what whoever writes the topic can do without the audit key);
    3. the records are returned as sent: their new offsets and the headers they carry.
    """
    recreate_events_topic(settings)
    kafka = producer(settings)
    sent: dict[int, list[Message]] = {}
    try:
        for partition, found in sorted(records.items()):
            previous = GENESIS
            for record in found:
                headers = list(record.headers)
                if rechain:
                    headers = [(k, v) for k, v in headers if k != HEADER_CHAIN]
                    previous = link(previous, record_digest(record.key, record.value, headers))
                    headers.append((HEADER_CHAIN, previous.hex().encode()))
                metadata = kafka.send(settings.events_topic, key=record.key, value=record.value, headers=headers,
                                      partition=partition).get(timeout=30)
                sent.setdefault(partition, []).append(
                    record._replace(partition=partition, offset=metadata.offset, headers=tuple(headers)))
    finally:
        kafka.close()
    return sent


def ledger_position(record: Message) -> int:
    return int(dict(record.headers)[HEADER_POSITION])


def make_ledger_agree(conn: Any, sent: Mapping[int, Sequence[Message]]) -> None:
    """Rewrite the ledger to say what the topic now holds: each event's value, offset and link, and
    each partition's chain head (the forger's second half: both copies then agree)."""
    for partition, records in sent.items():
        for record in records:
            position = ledger_position(record)
            conn.execute("UPDATE evp_events SET value = %s WHERE position = %s", (record.value, position))
            conn.execute("UPDATE evp_published SET kafka_offset = %s, chain = %s WHERE position = %s",
                         (record.offset, link_header(record.headers), position))
        last = records[-1]
        conn.execute("UPDATE evp_chain_heads SET kafka_offset = %s, chain = %s WHERE partition = %s",
                     (last.offset, link_header(last.headers), partition))


# -- the broker's segment files ------------------------------------------------------------------
#: A v2 record batch begins: base offset (8), length of the rest (4), leader epoch (4), magic (1),
#: CRC-32C (4) of everything after it, attributes (2), last offset delta (4), ... 61 bytes in all.
BATCH_HEADER = 61
_CONTROL = 0x20  #: attributes bit: a transaction marker, not records


@dataclass(frozen=True)
class RecordBatch:
    segment: Path
    position: int  #: where in the segment file the batch begins
    size: int
    first_offset: int
    last_offset: int


def events_segments(settings: Settings) -> list[Path]:
    """The non-empty segment files of the events topic's partitions; the test fails when the
    broker's files are not on this machine."""
    segments = [p for p in kafka_segments(settings)
                if p.parent.name.startswith(settings.events_topic + "-") and p.stat().st_size > 0]
    if not segments:
        pytest.fail("the broker's segments are not on this machine: the test needs the local broker")
    return segments


def segment_partition(segment: Path) -> int:
    return int(segment.parent.name.rsplit("-", 1)[1])


def record_batches(segment: Path) -> list[RecordBatch]:
    """The record batches of a segment file, in order (transaction markers left out)."""
    data = segment.read_bytes()
    batches, position = [], 0
    while position + BATCH_HEADER <= len(data):
        base, length = struct.unpack_from(">qi", data, position)
        attributes, delta = struct.unpack_from(">hi", data, position + 21)
        if not attributes & _CONTROL:
            batches.append(RecordBatch(segment, position, 12 + length, base, base + delta))
        position += 12 + length
    return batches


def spoil(batch: RecordBatch) -> None:
    """Flip every byte of the batch's records, in place: the batch keeps its offsets and length
    (the broker still serves it), and no longer matches its CRC."""
    with batch.segment.open("r+b") as segment:
        segment.seek(batch.position + BATCH_HEADER)
        records = segment.read(batch.size - BATCH_HEADER)
        segment.seek(batch.position + BATCH_HEADER)
        segment.write(bytes(b ^ 0xFF for b in records))
