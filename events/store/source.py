"""Where a consumer's batches come from: the events topic, fetched and decoded.

:class:`InlineSource` fetches and decodes in the consumer's own thread. :class:`PrefetchSource`
does both in a process of its own, one batch ahead, so the next batch is fetched and decoded
while the consumer applies the current one (kafka-python's fetch and fastavro's decode are
Python-bound: a thread would share the interpreter lock with the apply; a process gets its
own core). Contract of a source, both kinds:

1. :meth:`assign` makes it read exactly the given partitions, each from the given offset
   (``None``: from the beginning), and returns the offsets it will read from. Nothing fetched
   before an ``assign`` is delivered after it;
2. :meth:`poll` returns one :class:`Batch` (possibly empty): the raw messages partition by
   partition, each in offset order, their decoded records in the same order (a record that
   does not decode is a :class:`~events.store.log.BadRecord`, never an exception), and the
   position after the batch of each partition;
3. a broker outage raises :class:`~events.errors.ServiceUnavailable`, and so does a
   prefetch process that died: both are retryable, and the consumer re-opens its source and
   re-seeks from the positions it committed, so nothing is lost or applied twice;
4. a prefetch process exits on its own when its consumer's process dies (its control pipe
   closes, or its parent changes).

Batches cross the pipe as ``marshal`` data (the messages and the records as plain values:
pickling the records cost ~16 µs a record, marshal ~4); the consumer rebuilds the records
and looks up each one's policy in its own codec. Measured on 2 cores (``bench_projection``),
the prefetch process gains ~1.1x at 200k events: both cores are then ~85% busy with the
consumer, the process, PostgreSQL and the broker, so the overlap is bounded by the machine.
"""

from __future__ import annotations

import logging
import marshal
import os
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from kafka import KafkaConsumer, TopicPartition

from events.adapters.kafka import consumer as make_consumer, kafka_errors, where
from events.errors import EvpError, ServiceUnavailable
from events.project import catalog_for
from events.gc_pause import gc_paused
from events.schema.catalog import Catalog
from events.schema.codec import Codec
from events.schema.registry import KafkaSchemaLog, SchemaRegistry
from events.settings import Settings
from events.store.log import BadRecord, LogRecord, decode_record

log = logging.getLogger(__name__)

#: How long a poll of the prefetch process waits for its first answer after an assign.
ASSIGN_TIMEOUT_S = 60.0


def open_codec(settings: Settings, catalog: Catalog | None = None) -> Codec:
    """A codec that reads any registered schema (readers never register).

    ``catalog`` (default: :func:`events.project.catalog_for`) only decides which current
    schema old records are resolved against; a type it does not know reads as written.
    """
    registry = SchemaRegistry(KafkaSchemaLog(settings))
    return Codec(registry, catalog or catalog_for(settings), settings.events_topic)


class Message(NamedTuple):
    """A raw record of the topic: what a dead letter copies (the attributes of kafka-python's record)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class Batch:
    """One poll: the raw messages, their decoded records in the same order, the positions after it."""

    messages: Sequence[Any] = ()  #: kafka-python records or :class:`Message`\\ s (the same attributes)
    records: Sequence[LogRecord | BadRecord] = ()
    positions: Mapping[int, int] = field(default_factory=dict)


class InlineSource:
    """Fetch and decode in the calling thread, through the consumer's own KafkaConsumer."""

    def __init__(self, settings: Settings, consumer: KafkaConsumer, codec: Codec, batch_size: int) -> None:
        self.settings, self._consumer, self._codec, self.batch_size = settings, consumer, codec, batch_size
        self._partitions: list[TopicPartition] = []

    def assign(self, positions: Mapping[int, int | None]) -> dict[int, int]:
        """Contract step 1."""
        self._partitions = [TopicPartition(self.settings.events_topic, p) for p in sorted(positions)]
        with kafka_errors(self.settings):
            self._consumer.assign(self._partitions)
            for tp in self._partitions:
                offset = positions[tp.partition]
                if offset is None:
                    self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, offset)
            return {tp.partition: self._consumer.position(tp) for tp in self._partitions}

    def poll(self, timeout_ms: int) -> Batch:
        """Contract step 2."""
        if not self._partitions:  # scaling out, and every partition is leased by another consumer
            time.sleep(timeout_ms / 1000)
            return Batch()
        with kafka_errors(self.settings):
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=self.batch_size)
            positions = {tp.partition: self._consumer.position(tp) for tp in self._partitions}
        messages = [m for tp in sorted(polled, key=lambda t: t.partition) for m in polled[tp]]
        return Batch(messages, [decode_record(self._codec, m) for m in messages], positions)

    def close(self) -> None:
        """The KafkaConsumer is its owner's to close."""


class PrefetchSource:
    """Fetch and decode in a process of its own, one batch ahead of the consumer.

    The process is started on the first :meth:`assign`; it starts in about a second, so
    short-lived consumers are better served inline.
    """

    def __init__(self, settings: Settings, catalog: Catalog | None, batch_size: int) -> None:
        self.settings, self.catalog, self.batch_size = settings, catalog, batch_size
        self._process: Any = None
        self._control: Connection | None = None
        self._data: Connection | None = None
        self._epoch = ""
        self._codec: Codec | None = None

    def _start(self) -> None:
        """Start the process as ``python -m events.store.source`` (not multiprocessing's spawn,
        which re-imports the caller's main module), with a pipe each way."""
        control_theirs, control_ours = os.pipe()
        data_ours, data_theirs = os.pipe()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "events.store.source", str(control_theirs), str(data_theirs)],
            pass_fds=(control_theirs, data_theirs), stdin=subprocess.DEVNULL,
            # The child imports evp exactly as this process does (an editable checkout, a project dir).
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
        )
        os.close(control_theirs)
        os.close(data_theirs)
        self._control, self._data = Connection(control_ours, readable=False), Connection(data_ours, writable=False)
        self._send(("start", self.settings, self.catalog, self.batch_size, os.getpid()))

    def assign(self, positions: Mapping[int, int | None]) -> dict[int, int]:
        """Contract step 1: a new epoch; batches of older epochs still in the pipe are dropped."""
        if self._process is None:
            self._start()
        assert self._control is not None
        self._epoch = uuid.uuid4().hex
        self._send(("assign", self._epoch, dict(positions)))
        deadline = time.monotonic() + ASSIGN_TIMEOUT_S
        while True:
            answer = self._receive(max(0.0, deadline - time.monotonic()))
            if answer is None:
                raise self._unavailable(f"no answer to an assign in {ASSIGN_TIMEOUT_S:.0f}s")
            if answer[0] == "assigned" and answer[1] == self._epoch:
                return dict(answer[2])

    def poll(self, timeout_ms: int) -> Batch:
        """Contract step 2 (the batch was fetched and decoded while the last one was applied)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            answer = self._receive(max(0.0, deadline - time.monotonic()))
            if answer is None:
                return Batch()
            if answer[0] == "batch" and answer[1] == self._epoch:
                _, _, raw, decoded, positions = answer
                topic, codec = self.settings.events_topic, self._policies()
                messages = [Message(topic, *fields) for fields in raw]
                return Batch(messages, [_restore(codec, m, d) for m, d in zip(messages, decoded)], positions)

    def _policies(self) -> Codec:
        """The codec the records' writer policies are looked up in (the process sends only schema ids)."""
        if self._codec is None:
            self._codec = open_codec(self.settings, self.catalog)
        return self._codec

    def _send(self, message: tuple[Any, ...]) -> None:
        assert self._control is not None
        try:
            self._control.send(message)
        except (OSError, EOFError) as err:
            raise self._unavailable(f"control pipe closed: {err}") from err

    def _receive(self, timeout_s: float) -> tuple[Any, ...] | None:
        """The next answer of the process, None after ``timeout_s``; an error it reports is raised here."""
        assert self._data is not None
        try:
            if not self._data.poll(timeout_s):
                if self._process.poll() is not None:
                    raise self._unavailable(f"the prefetch process exited with code {self._process.returncode}")
                return None
            answer: tuple[Any, ...] = marshal.loads(self._data.recv_bytes())
        except (OSError, EOFError) as err:
            raise self._unavailable(f"the prefetch process went away: {err}") from err
        if answer[0] == "error":
            raise ServiceUnavailable(answer[1], answer[2], answer[3])
        if answer[0] == "fatal":
            raise EvpError(f"the prefetch process of {self.settings.events_topic} failed: {answer[1]}")
        return answer

    def _unavailable(self, reason: str) -> ServiceUnavailable:
        return ServiceUnavailable("kafka", where(self.settings), f"prefetch of {self.settings.events_topic}: {reason}")

    def close(self) -> None:
        """Stop the process (it holds nothing but a Kafka connection and batches not yet applied)."""
        for pipe in (self._control, self._data):
            if pipe is not None:
                pipe.close()
        if self._process is not None:
            try:
                self._process.wait(timeout=5)  # its control pipe closed: it exits on its own
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process = self._control = self._data = None


# -- the prefetch process ------------------------------------------------------------------
def _compact(record: LogRecord | BadRecord) -> Any:
    """A decoded record as plain values (``marshal`` writes them fast), or why it did not decode."""
    if isinstance(record, BadRecord):
        return record.reason
    return (record.stream_id, record.version, record.event_id.bytes, record.event_type, record.schema_id,
            record.actor, record.occurred_at, record.data)


def _restore(codec: Codec, message: Message, compact: Any) -> LogRecord | BadRecord:
    """The record :func:`_compact` wrote, with its writer's policy looked up here."""
    if isinstance(compact, str):
        return BadRecord(message.partition, message.offset, message.key, message.value, message.headers, compact)
    stream_id, version, event_id, event_type, schema_id, actor, occurred_at, data = compact
    return LogRecord(message.partition, message.offset, stream_id, version, uuid.UUID(bytes=event_id), event_type,
                     schema_id, actor, occurred_at, data, codec.policy(schema_id))


def _reply(data: Connection, *answer: Any) -> None:
    """One answer to the consumer, as ``marshal`` data (plain values only)."""
    data.send_bytes(marshal.dumps(answer))


def _prefetch_main(control: Connection, data: Connection) -> None:
    """The process: follow assigns from ``control``, send batches and answers on ``data``."""
    consumer: KafkaConsumer | None = None
    try:
        _, settings, catalog, batch_size, parent = control.recv()
        # A newly assigned partition is fetchable once its position is validated; meanwhile
        # kafka-python sleeps retry_backoff_ms a poll (default 100 ms).
        consumer = make_consumer(settings, max_poll_records=batch_size, fetch_max_wait_ms=200,
                                 retry_backoff_ms=10)
        source = InlineSource(settings, consumer, open_codec(settings, catalog), batch_size)
        epoch: str | None = None
        sent: Mapping[int, int] = {}
        while os.getppid() == parent:
            if epoch is None or control.poll(0):  # idle until assigned; a new assign wins over fetching
                if not control.poll(1.0):
                    continue
                _, epoch, positions = control.recv()
                try:
                    sent = source.assign(positions)
                    _reply(data, "assigned", epoch, dict(sent))
                except ServiceUnavailable as err:
                    _reply(data, "error", err.service, err.target, err.reason)
                    epoch = None
                continue
            try:
                with gc_paused():
                    batch = source.poll(200)
                    # Control records (another producer's transaction markers) move a position with no message.
                    if batch.messages or (batch.positions and batch.positions != sent):
                        raw = [(m.partition, m.offset, m.key, m.value, tuple(m.headers or ())) for m in batch.messages]
                        decoded = [_compact(r) for r in batch.records]
                        _reply(data, "batch", epoch, raw, decoded, dict(batch.positions))
                        sent = batch.positions
            except ServiceUnavailable as err:
                _reply(data, "error", err.service, err.target, err.reason)
                epoch = None  # wait for the consumer to re-seek
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the consumer went away
    except Exception as err:  # noqa: BLE001 - a verdict (a bad setting, a bug): tell the consumer, then stop
        try:
            _reply(data, "fatal", f"{type(err).__name__}: {err}")
        except OSError:
            pass
        log.error("evp prefetch process failed:\n%s", traceback.format_exc())
    finally:
        if consumer is not None:
            consumer.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # kafka-python warns when parsing a large fetch holds its event loop; this process has no other poller.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    _prefetch_main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
