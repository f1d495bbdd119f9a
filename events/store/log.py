"""Reading the event log from Kafka: decoded records with their coordinates.

Readers pin what they read by (partition, offset) ranges, which is what snapshots record
and what projections store as their position. Duplicates that the relay may publish after
a crash carry the same stream id and version; :class:`Deduplicator` drops them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.errors import CorruptRecordError

from events.schema.codec import Codec
from events.privacy.policy import Policy
from events.errors import DecodeError, ServiceUnavailable
from events.event import HEADER_ACTOR, HEADER_EVENT_ID, HEADER_OCCURRED_AT, HEADER_STREAM_VERSION
from events.adapters.kafka import consumer, kafka_errors, where
from events.settings import Settings


@dataclass(frozen=True)
class LogRecord:
    """One record of the events topic, decoded (personal fields still encrypted)."""

    partition: int
    offset: int
    stream_id: str
    version: int
    event_id: uuid.UUID
    event_type: str
    schema_id: int
    actor: str
    occurred_at: str
    data: Mapping[str, Any]
    #: the privacy policy of the schema the record was written with (None when built by hand)
    policy: Policy | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be decoded, with the reason; it goes to the dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    reason: str


def decode_record(codec: Codec, message: Any) -> LogRecord | BadRecord:
    """Decode a kafka-python ConsumerRecord, never raising on bad input."""
    headers = {k: v for k, v in (message.headers or [])}
    try:
        if message.key is None:
            raise DecodeError("record has no key (stream id)")
        if message.value is None:
            raise DecodeError("record has no value")
        decoded = codec.decode(message.value)
        try:
            event_id = uuid.UUID(headers[HEADER_EVENT_ID].decode())
            version = int(headers[HEADER_STREAM_VERSION].decode())
        except (KeyError, ValueError, UnicodeDecodeError) as err:
            raise DecodeError(f"missing or malformed evp headers: {err}") from err
        return LogRecord(
            partition=message.partition,
            offset=message.offset,
            stream_id=message.key.decode("utf-8", errors="strict"),
            version=version,
            event_id=event_id,
            event_type=decoded.event_type,
            schema_id=decoded.schema_id,
            actor=headers.get(HEADER_ACTOR, b"").decode("utf-8", errors="replace"),
            occurred_at=headers.get(HEADER_OCCURRED_AT, b"").decode("utf-8", errors="replace"),
            data=decoded.datum,
            policy=decoded.policy,
        )
    except (DecodeError, UnicodeDecodeError) as err:
        return BadRecord(message.partition, message.offset, message.key, message.value, tuple(headers.items()), str(err))


class Deduplicator:
    """Drops records whose (stream, version) was already seen; relays may re-publish after a crash."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}

    def is_new(self, record: LogRecord) -> bool:
        if record.version <= self._versions.get(record.stream_id, 0):
            return False
        self._versions[record.stream_id] = record.version
        return True


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """The current end offset of every partition (what a snapshot pins)."""
    reader = consumer(settings)
    try:
        with kafka_errors(settings):
            partitions = reader.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            return {tp.partition: off for tp, off in reader.end_offsets(tps).items()}
    finally:
        reader.close()


#: A pinned read that gets no record for this long, short of its end, fails.
READ_IDLE_TIMEOUT_S = 30.0


def read_pinned(
    settings: Settings, topic: str, ranges: Mapping[int, tuple[int, int]], *, max_poll_records: int = 10_000,
    on_corrupt: Callable[[Corrupt], None] | None = None,
) -> Iterator[Any]:
    """Every raw record in ``[start, end)`` of each partition, partition by partition, in offset order.

    Offsets may have gaps (compaction, transaction markers); the consumer's position moves
    past them, so the loop ends at the pinned end whether or not a record sits there. A
    partition that yields nothing for :data:`READ_IDLE_TIMEOUT_S` raises ServiceUnavailable
    rather than waiting forever.

    A record batch that fails its CRC check (a flipped byte in a segment) raises, unless
    ``on_corrupt`` is given: then the read steps past the batch one offset at a time (the
    broker sends whole batches, and the client does not say where one ends), reports the
    unreadable range to ``on_corrupt`` and goes on.
    """
    # The records are known to exist: a fetch that reaches the end of a partition must not wait
    # the default half second for more (it did, once per partition: 20k records 1.45 s -> 0.45 s);
    # and a partition just assigned is not fetchable until its position is validated, during
    # which kafka-python sleeps retry_backoff_ms (default 100 ms) per poll.
    reader = consumer(settings, max_poll_records=max_poll_records, fetch_max_wait_ms=20, retry_backoff_ms=10)
    try:
        with kafka_errors(settings):
            for partition, (start, end) in sorted(ranges.items()):
                if end <= start:
                    continue
                tp = TopicPartition(topic, partition)
                reader.assign([tp])
                reader.seek(tp, start)
                deadline = time.monotonic() + READ_IDLE_TIMEOUT_S
                while reader.position(tp) < end:
                    try:
                        batch = reader.poll(timeout_ms=500).get(tp, [])
                    except CorruptRecordError as err:
                        if on_corrupt is None:
                            raise
                        on_corrupt(_skip_corrupt(reader, tp, end, err))
                        deadline = time.monotonic() + READ_IDLE_TIMEOUT_S
                        continue
                    for message in batch:
                        if message.offset >= end:
                            break
                        yield message
                    if batch:
                        deadline = time.monotonic() + READ_IDLE_TIMEOUT_S
                    elif time.monotonic() > deadline:
                        raise ServiceUnavailable("kafka", where(settings), f"no records from {topic!r} partition {partition} "
                                                 f"before offset {end} within {READ_IDLE_TIMEOUT_S:.0f}s")
    finally:
        reader.close()


@dataclass(frozen=True)
class Corrupt:
    """Offsets ``[start, end)`` of a partition that no read can decode: their batch fails its CRC check."""

    partition: int
    start: int
    end: int
    reason: str


def _skip_corrupt(reader: Any, tp: TopicPartition, end: int, error: CorruptRecordError) -> Corrupt:
    """Seek past the corrupt batch that ``error`` reports at the reader's position; the range skipped."""
    start = reader.position(tp)
    offset = start + 1
    while offset < end:
        reader.seek(tp, offset)
        try:
            polled = reader.poll(timeout_ms=500, max_records=1).get(tp, [])
        except CorruptRecordError:
            offset += 1
            continue
        reader.seek(tp, polled[0].offset if polled else offset)
        break
    else:
        reader.seek(tp, end)
    return Corrupt(tp.partition, start, min(offset, end), str(error))


def read_range(
    settings: Settings, topic: str, codec: Codec, ranges: Mapping[int, tuple[int, int]]
) -> Iterator[LogRecord | BadRecord]:
    """Every record in ``[start, end)`` of each partition, decoded (bad ones as :class:`BadRecord`)."""
    for message in read_pinned(settings, topic, ranges):
        yield decode_record(codec, message)
