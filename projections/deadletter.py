"""Dead letters: records a projection cannot apply go to a side topic, and the projection goes on.

A record is dead-lettered when it cannot be decoded (a :class:`~events.store.log.BadRecord`) or
when its projection refuses it (a *poison* record: :data:`POISON_ERRORS`). The letter keeps
the original key, value and headers byte for byte and adds headers that say why and where
it came from, so it can be inspected, fixed and re-published.

Letters are sent before the batch that skips them commits, so none is lost; a crash between
the two re-sends them on restart. The dead-letter topic is therefore at-least-once: readers
that care dedupe on (source topic, partition, offset), which every letter carries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from kafka import KafkaProducer, TopicPartition

from events.settings import Settings
from events.errors import EvpError, InvalidEvent
from events.adapters.kafka import consumer, kafka_errors, producer as make_producer

#: Errors that mean "this record is bad", not "the platform is broken": the record is
#: dead-lettered and the batch goes on. Anything else stops the runner (and is retried).
POISON_ERRORS: tuple[type[BaseException], ...] = (InvalidEvent, psycopg.DataError, psycopg.IntegrityError)

HEADER_REASON = "evp.dlq.reason"
HEADER_STAGE = "evp.dlq.stage"
HEADER_PROJECTION = "evp.dlq.projection"
HEADER_SOURCE_TOPIC = "evp.dlq.source_topic"
HEADER_SOURCE_PARTITION = "evp.dlq.source_partition"
HEADER_SOURCE_OFFSET = "evp.dlq.source_offset"

STAGE_DECODE = "decode"  #: the bytes are not an evp record
STAGE_APPLY = "apply"  #: the record decoded, but the projection refused it

_MAX_REASON = 2000


@dataclass(frozen=True)
class DeadLetter:
    """One letter as read back from the dead-letter topic."""

    source_topic: str
    source_partition: int
    source_offset: int
    projection: str
    stage: str
    reason: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


class DeadLetterQueue:
    """Sends letters for one projection; the producer is created on the first letter."""

    def __init__(
        self, settings: Settings, projection: str, *, producer_factory: Callable[[], KafkaProducer] | None = None
    ) -> None:
        self.settings, self.topic, self.projection = settings, settings.dead_letter_topic, projection
        self._factory = producer_factory or (lambda: make_producer(settings))
        self._producer: KafkaProducer | None = None
        self._pending: list[tuple[int, Any]] = []
        self.sent = 0

    def send(self, message: Any, reason: str, stage: str) -> None:
        """Queue ``message`` (a kafka-python ConsumerRecord) with the reason it was refused."""
        extra = [
            (HEADER_REASON, reason[:_MAX_REASON].encode("utf-8", errors="replace")),
            (HEADER_STAGE, stage.encode()),
            (HEADER_PROJECTION, self.projection.encode()),
            (HEADER_SOURCE_TOPIC, message.topic.encode()),
            (HEADER_SOURCE_PARTITION, str(message.partition).encode()),
            (HEADER_SOURCE_OFFSET, str(message.offset).encode()),
        ]
        original = [(k, v) for k, v in (message.headers or []) if not k.startswith("evp.dlq.")]
        # Kafka needs a key or a value; a record with neither still deserves a letter.
        value = message.value if message.value is not None or message.key is not None else b""
        if self._producer is None:
            self._producer = self._factory()
        with kafka_errors(self.settings):
            future = self._producer.send(self.topic, key=message.key, value=value, headers=original + extra)
        self._pending.append((message.offset, future))

    def flush(self, timeout: float = 30.0) -> int:
        """Wait until every queued letter is acknowledged; EvpError if one was not."""
        if not self._pending:
            return 0
        assert self._producer is not None
        with kafka_errors(self.settings):
            self._producer.flush(timeout=timeout)
        pending, self._pending = self._pending, []
        for offset, future in pending:
            try:
                future.get(timeout=0)
            except Exception as err:  # noqa: BLE001 - any failure means the batch must not commit
                raise EvpError(f"dead letter for offset {offset} was not acknowledged by {self.topic}: {err}") from err
        self.sent += len(pending)
        return len(pending)

    def discard(self) -> None:
        """Forget letters of a batch that is being rolled back (they may still arrive: at-least-once)."""
        self._pending.clear()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None


def describe_error(error: BaseException) -> str:
    """A one-line reason for a refused record: the error class and its first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else '(no message)'}"


def read_dead_letters(settings: Settings, topic: str, *, timeout_s: float = 10.0) -> list[DeadLetter]:
    """Every letter in the dead-letter topic, in order (for inspection and tests)."""
    reader = consumer(settings)
    letters: list[DeadLetter] = []
    try:
        with kafka_errors(settings):
            partitions = sorted(reader.partitions_for_topic(topic) or ())
            tps = [TopicPartition(topic, p) for p in partitions]
            if not tps:
                return []
            reader.assign(tps)
            reader.seek_to_beginning(*tps)
            ends = reader.end_offsets(tps)
            polls_left = max(1, int(timeout_s / 0.5))
            while any(reader.position(tp) < ends[tp] for tp in tps) and polls_left:
                polls_left -= 1
                for messages in reader.poll(timeout_ms=500).values():
                    letters.extend(_letter(m) for m in messages)
    finally:
        reader.close()
    return letters


def _letter(message: Any) -> DeadLetter:
    headers: dict[str, bytes] = {k: v for k, v in message.headers or []}

    def text(name: str) -> str:
        return headers.get(name, b"").decode("utf-8", errors="replace")

    return DeadLetter(
        source_topic=text(HEADER_SOURCE_TOPIC),
        source_partition=int(text(HEADER_SOURCE_PARTITION) or -1),
        source_offset=int(text(HEADER_SOURCE_OFFSET) or -1),
        projection=text(HEADER_PROJECTION),
        stage=text(HEADER_STAGE),
        reason=text(HEADER_REASON),
        key=message.key,
        value=message.value,
        headers=tuple(message.headers or ()),
    )
