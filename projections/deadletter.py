"""Dead letters: records a projection cannot apply go to a side topic, and the projection goes on.

A record is dead-lettered when it cannot be decoded (a :class:`~events.store.log.BadRecord`),
when it is not a well-formed record of the topic (a stream version below 1, an empty key, a
schema registered for another topic), when it claims a (stream, version) already taken by a
record with other content (a *conflicting duplicate*), or when its projection refuses it (a
*poison* record: :data:`POISON_ERRORS`). Contract of a letter:

1. it keeps the original key, value and headers byte for byte and adds ``evp.dlq.*``
   headers: why (reason, stage), whose (projection), where it came from (source topic,
   partition, offset) and how many replays it has failed (attempts);
2. it is never larger than :data:`MAX_LETTER_BYTES`: a record too large to copy (a record
   that just fits the events topic's message limit cannot fit the dead-letter topic's with the
   headers added) is dead-lettered without its content. The letter names the parts left out
   (``evp.dlq.omitted``), the original's size and digest; a replay reads the original back
   from the source topic at its partition and offset and checks the digest. A letter the
   broker still refuses as too large is sent again the same way, so a large record never
   stops a runner;
3. letters are sent before the batch that skips them commits, so none is lost; a crash
   between the two re-sends them on restart. The dead-letter topic is therefore
   at-least-once: readers group letters by source record (:func:`dead_records`), which
   every letter names;
4. ``evp projections dlq list`` shows one line per dead record of a view (its latest
   letter); ``evp projections dlq replay`` re-drives them through the view's handlers
   (:meth:`projections.runner.LogConsumer.replay`): one that applies is applied exactly once,
   one that still fails gets a new letter with ``attempts`` one higher. A replay reads the
   letters up to the topic's end when it starts, so it never re-reads its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg
from kafka import KafkaProducer, TopicPartition
from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from events.settings import Settings
from events.errors import EvpError, InvalidEvent, NotFound, ServiceUnavailable
from events.adapters.kafka import consumer, kafka_errors, producer as make_producer, where
from events.event import HEADER_EVENT_ID
from events.store.chain import record_digest
from events.store.source import Message

#: Errors that mean "this record is bad", not "the platform is broken": the record is
#: dead-lettered and the batch goes on. Anything else stops the runner (and is retried).
POISON_ERRORS: tuple[type[BaseException], ...] = (InvalidEvent, psycopg.DataError, psycopg.IntegrityError)

HEADER_REASON = "evp.dlq.reason"
HEADER_STAGE = "evp.dlq.stage"
HEADER_PROJECTION = "evp.dlq.projection"
HEADER_SOURCE_TOPIC = "evp.dlq.source_topic"
HEADER_SOURCE_PARTITION = "evp.dlq.source_partition"
HEADER_SOURCE_OFFSET = "evp.dlq.source_offset"
HEADER_ATTEMPTS = "evp.dlq.attempts"  #: replays the record has failed (absent: none)
HEADER_OMITTED = "evp.dlq.omitted"  #: parts of the original left out for size: ``value``, ``key``, ``headers``
HEADER_ORIGINAL_BYTES = "evp.dlq.original_bytes"  #: the original's key, value and headers, in bytes
HEADER_ORIGINAL_DIGEST = "evp.dlq.original_sha256"  #: :func:`events.store.chain.record_digest` of the original, hex

STAGE_DECODE = "decode"  #: the bytes are not a well-formed evp record of the topic
STAGE_CONFLICT = "conflict"  #: a (stream, version) already taken by a record with other content
STAGE_APPLY = "apply"  #: the record decoded, but the projection refused it

#: The largest letter sent whole (key, value and headers): under Kafka's default 1 MB message limit.
MAX_LETTER_BYTES = 1_000_000
#: A key or header set up to this size is kept when the value is left out.
_KEPT_PART_BYTES = 16 * 1024
_MAX_REASON = 2000
_SIZE_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError)

Headers = list[tuple[str, bytes]]


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
    letter_offset: int = -1  #: its own offset in the dead-letter topic
    dead_at: datetime | None = None  #: when it was sent (the letter's Kafka timestamp)
    attempts: int = 0  #: replays of the record that failed before this letter
    omitted: tuple[str, ...] = ()  #: parts of the original not in the letter (it was too large)
    original_bytes: int | None = None
    original_digest: str = ""

    @property
    def event_id(self) -> str | None:
        """The original's ``evp.event_id`` header, when it has a readable one."""
        for name, value in self.original_headers:
            if name == HEADER_EVENT_ID:
                return value.decode("utf-8", errors="replace") if value else None
        return None

    @property
    def original_headers(self) -> tuple[tuple[str, bytes], ...]:
        """The headers the original record carried (the letter's own left out)."""
        return tuple((k, v) for k, v in self.headers if not k.startswith("evp.dlq."))

    @property
    def source(self) -> tuple[str, int, int]:
        return self.source_topic, self.source_partition, self.source_offset


@dataclass(frozen=True)
class DeadRecord:
    """One refused source record and its letters (re-sends after a crash, failed replays)."""

    latest: DeadLetter  #: the newest letter: why the record is dead now
    letters: int
    first_at: datetime | None  #: when it was first dead-lettered


@dataclass
class _Pending:
    message: Any
    reason: str
    stage: str
    attempts: int
    omitted: bool
    future: Any


class DeadLetterQueue:
    """Sends letters for one projection; the producer is created on the first letter."""

    def __init__(
        self, settings: Settings, projection: str, *, producer_factory: Callable[[], KafkaProducer] | None = None
    ) -> None:
        self.settings, self.topic, self.projection = settings, settings.dead_letter_topic, projection
        self._factory = producer_factory or (lambda: make_producer(settings))
        self._producer: KafkaProducer | None = None
        self._pending: list[_Pending] = []
        self.sent = 0
        self.omitted = 0  #: letters sent without the original's content (too large)

    def send(self, message: Any, reason: str, stage: str, *, attempts: int = 0) -> None:
        """Queue ``message`` (a kafka-python ConsumerRecord or a :class:`Message`) with the reason it was refused."""
        original = [(k, v) for k, v in (message.headers or []) if not k.startswith("evp.dlq.")]
        fits = _size(message.key, message.value, original) + _MAX_REASON + 512 <= MAX_LETTER_BYTES
        self._pending.append(self._send(message, reason, stage, attempts, omit=not fits))

    def _send(self, message: Any, reason: str, stage: str, attempts: int, *, omit: bool) -> _Pending:
        """Contract steps 1 and 2: the letter, whole or without the original's content."""
        original = [(k, v) for k, v in (message.headers or []) if not k.startswith("evp.dlq.")]
        extra: Headers = [
            (HEADER_REASON, reason[:_MAX_REASON].encode("utf-8", errors="replace")),
            (HEADER_STAGE, stage.encode()),
            (HEADER_PROJECTION, self.projection.encode()),
            (HEADER_SOURCE_TOPIC, message.topic.encode()),
            (HEADER_SOURCE_PARTITION, str(message.partition).encode()),
            (HEADER_SOURCE_OFFSET, str(message.offset).encode()),
        ]
        if attempts:
            extra.append((HEADER_ATTEMPTS, str(attempts).encode()))
        key, value, headers = message.key, message.value, original
        if omit:
            key, value, headers, described = _without_content(message.key, message.value, original)
            extra += described
        # Kafka needs a key or a value; a record with neither still deserves a letter.
        if value is None and key is None:
            value = b""
        if self._producer is None:
            self._producer = self._factory()
        try:
            with kafka_errors(self.settings):
                future = self._producer.send(self.topic, key=key, value=value, headers=headers + extra)
        except EvpError as err:
            if omit or not isinstance(err.__cause__, _SIZE_ERRORS):
                raise
            return self._send(message, reason, stage, attempts, omit=True)
        return _Pending(message, reason, stage, attempts, omit, future)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait until every queued letter is acknowledged; EvpError if one was not.

        Letters the broker refuses as too large (and those of the same flush it then aborts:
        an idempotent producer refuses everything after such a refusal) are sent again
        without the originals' content (contract step 2), on a new producer, and waited for
        in turn; a letter refused again is an error.
        """
        if not self._pending:
            return 0
        done = 0
        for round_ in range(3):
            assert self._producer is not None
            try:
                with kafka_errors(self.settings):
                    self._producer.flush(timeout=timeout)
            except ServiceUnavailable:
                raise
            except EvpError:
                pass  # kafka-python's flush gives up on a batch it split after a size refusal: each future says how it went
            pending, self._pending = self._pending, []
            refused: list[_Pending] = []
            for item in pending:
                try:
                    item.future.get(timeout=timeout)
                except _SIZE_ERRORS:
                    refused.append(item)
                    continue
                except Exception as err:  # noqa: BLE001 - any failure means the batch must not commit
                    self._pending.clear()
                    raise EvpError(f"dead letter for offset {item.message.offset} was not acknowledged by {self.topic}: "
                                   f"{err}") from err
                done += 1
                self.omitted += item.omitted
            if not refused:
                break
            if round_ == 2:
                raise EvpError(f"dead letters for offsets {sorted(i.message.offset for i in refused)} were refused by "
                               f"{self.topic} as too large, even without the records' content")
            self.close()
            for item in refused:
                self._pending.append(self._send(item.message, item.reason, item.stage, item.attempts, omit=True))
        self.sent += done
        return done

    def discard(self) -> None:
        """Forget letters of a batch that is being rolled back (they may still arrive: at-least-once)."""
        self._pending.clear()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None


def _size(key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v or b"") for k, v in headers)


def _without_content(key: bytes | None, value: bytes | None,
                     headers: Headers) -> tuple[bytes | None, bytes | None, Headers, Headers]:
    """The parts of a too-large record a letter keeps, and the headers that describe the rest."""
    omitted = ["value"]
    kept_key: bytes | None = key
    if len(key or b"") > _KEPT_PART_BYTES:
        kept_key = None
        omitted.append("key")
    kept_headers = headers
    if _size(None, None, headers) > _KEPT_PART_BYTES:
        kept_headers = []
        omitted.append("headers")
    described: Headers = [
        (HEADER_OMITTED, ",".join(omitted).encode()),
        (HEADER_ORIGINAL_BYTES, str(_size(key, value, headers)).encode()),
        (HEADER_ORIGINAL_DIGEST, record_digest(key, value, headers).hex().encode()),
    ]
    return kept_key, b"", kept_headers, described


def describe_error(error: BaseException) -> str:
    """A one-line reason for a refused record: the error class and its first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else '(no message)'}"


#: A read of the dead-letter topic that gets nothing for this long, short of its end, fails.
READ_IDLE_TIMEOUT_S = 10.0


def read_dead_letters(settings: Settings, topic: str, *, timeout_s: float = READ_IDLE_TIMEOUT_S,
                      projection: str | None = None) -> list[DeadLetter]:
    """Every letter in the dead-letter topic up to its end now, in order (of ``projection`` only, if given).

    ServiceUnavailable when no letter arrives for ``timeout_s`` while short of the end.
    """
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
            deadline = time.monotonic() + timeout_s
            while any(reader.position(tp) < ends[tp] for tp in tps):
                polled = reader.poll(timeout_ms=500)
                for tp, messages in polled.items():
                    letters.extend(_letter(m) for m in messages if m.offset < ends[tp])
                if polled:
                    deadline = time.monotonic() + timeout_s
                elif time.monotonic() > deadline:
                    raise ServiceUnavailable("kafka", where(settings),
                                             f"no dead letters from {topic!r} for {timeout_s:.0f}s short of its end")
    finally:
        reader.close()
    return [letter for letter in letters if projection is None or letter.projection == projection]


def _letter(message: Any) -> DeadLetter:
    headers: dict[str, bytes] = {k: v for k, v in message.headers or []}

    def text(name: str) -> str:
        return (headers.get(name) or b"").decode("utf-8", errors="replace")

    def number(name: str, default: int) -> int:
        try:
            return int(text(name))
        except ValueError:
            return default

    timestamp = getattr(message, "timestamp", None)
    omitted = text(HEADER_OMITTED)
    return DeadLetter(
        source_topic=text(HEADER_SOURCE_TOPIC),
        source_partition=number(HEADER_SOURCE_PARTITION, -1),
        source_offset=number(HEADER_SOURCE_OFFSET, -1),
        projection=text(HEADER_PROJECTION),
        stage=text(HEADER_STAGE),
        reason=text(HEADER_REASON),
        key=message.key,
        value=message.value,
        headers=tuple(message.headers or ()),
        letter_offset=message.offset,
        dead_at=datetime.fromtimestamp(timestamp / 1000, timezone.utc) if isinstance(timestamp, int) and timestamp >= 0 else None,
        attempts=number(HEADER_ATTEMPTS, 0),
        omitted=tuple(omitted.split(",")) if omitted else (),
        original_bytes=number(HEADER_ORIGINAL_BYTES, -1) if omitted else None,
        original_digest=text(HEADER_ORIGINAL_DIGEST),
    )


def dead_records(letters: Iterable[DeadLetter]) -> list[DeadRecord]:
    """One entry per source record (topic, partition, offset), its newest letter first in line, in source order."""
    grouped: dict[tuple[str, int, int], list[DeadLetter]] = {}
    for letter in letters:
        grouped.setdefault(letter.source, []).append(letter)
    return [DeadRecord(latest=max(group, key=lambda l: l.letter_offset), letters=len(group),
                       first_at=min((l.dead_at for l in group if l.dead_at is not None), default=None))
            for _, group in sorted(grouped.items())]


def select(records: Sequence[DeadRecord], *, offset: int | None, topic: str) -> list[DeadRecord]:
    """The dead records a replay re-drives: the one whose latest letter is at ``offset`` of ``topic``, or all (None).

    NotFound when no dead record's latest letter is at ``offset`` (an older letter of a record
    names the record as it was: replay its latest, which ``dlq list`` shows).
    """
    if offset is None:
        return list(records)
    chosen = [r for r in records if r.latest.letter_offset == offset]
    if not chosen:
        raise NotFound(f"no dead record of the view has its latest letter at offset {offset} of {topic} "
                       "(evp projections dlq list shows the offsets to replay)")
    return chosen


def source_message(letter: DeadLetter) -> Message:
    """The refused record as the runner read it: source coordinates, original key, value and headers."""
    return Message(letter.source_topic, letter.source_partition, letter.source_offset, letter.key, letter.value,
                   letter.original_headers)


def originals(settings: Settings, letters: Sequence[DeadLetter], *,
              timeout_s: float = READ_IDLE_TIMEOUT_S) -> dict[tuple[int, int], Message | str]:
    """For letters sent without their content (contract step 2): the original read back from the
    source topic, or why it cannot be (gone with retention, or not the record the letter describes)."""
    wanted = [l for l in letters if l.omitted]
    found: dict[tuple[int, int], Message | str] = {}
    if not wanted:
        return found
    reader = consumer(settings, max_poll_records=1)
    try:
        with kafka_errors(settings):
            for letter in wanted:
                tp = TopicPartition(letter.source_topic, letter.source_partition)
                reader.assign([tp])
                begin = reader.beginning_offsets([tp])[tp]
                place = (letter.source_partition, letter.source_offset)
                if letter.source_offset < begin:
                    found[place] = f"offset {letter.source_offset} is no longer on {letter.source_topic} (retention)"
                    continue
                reader.seek(tp, letter.source_offset)
                polled: list[Any] = []
                deadline = time.monotonic() + timeout_s
                while not polled and time.monotonic() < deadline:
                    polled = reader.poll(timeout_ms=500).get(tp, [])
                if not polled or polled[0].offset != letter.source_offset:
                    found[place] = f"offset {letter.source_offset} of {letter.source_topic} could not be read back"
                    continue
                message = polled[0]
                headers = [(k, v) for k, v in message.headers or []]
                if record_digest(message.key, message.value, headers).hex() != letter.original_digest:
                    found[place] = (f"the record at offset {letter.source_offset} of {letter.source_topic} is not the "
                                    "one dead-lettered (its digest differs)")
                    continue
                found[place] = Message(letter.source_topic, message.partition, message.offset, message.key,
                                       message.value, tuple(headers))
    finally:
        reader.close()
    return found


def as_dict(record: DeadRecord, state: Mapping[tuple[int, int], str] | None = None) -> dict[str, object]:
    """A dead record for ``dlq list --json``."""
    letter = record.latest
    out: dict[str, object] = {
        "letter_offset": letter.letter_offset, "source_topic": letter.source_topic,
        "source_partition": letter.source_partition, "source_offset": letter.source_offset,
        "stage": letter.stage, "reason": letter.reason, "event_id": letter.event_id,
        "key": letter.key.decode("utf-8", errors="replace") if letter.key is not None else None,
        "dead_at": letter.dead_at.isoformat() if letter.dead_at else None,
        "first_at": record.first_at.isoformat() if record.first_at else None,
        "letters": record.letters, "attempts": letter.attempts, "omitted": list(letter.omitted),
    }
    if state is not None:
        out["state"] = state.get((letter.source_partition, letter.source_offset), "dead")
    return out


