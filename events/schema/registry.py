"""The schema registry: every schema version ever written, with a global id, kept in a log.

It stores what Confluent's Schema Registry stores — subject, version, global id and
schema text — in a Kafka topic that keeps every record forever, so that the wire format's schema id always
resolves, in this process or any other, now or in ten years. Only the part serializers
need is here (register, look up by id, latest of a subject); :mod:`events.schema.registry_http`
serves the same registry over the Confluent REST API (``evp registry serve``), so
third-party clients can read evp's topics.

There is no registry server to hand out ids, so the log itself is the arbiter. A
registrar appends a *claim* for the next free id and re-reads the log; every reader folds
the log in the same order with the same rules, so all agree on which claim won:

- a record's id is *sane* if it is a JSON integer in 1..2³¹−1 (the wire format's id is a
  signed 32-bit in Confluent's clients) and at most one past the highest id so far (a
  registrar only ever claims highest + 1, so a jump can only be a forged record); a record
  without a sane id claims nothing and uses nothing up;
- a record is *refused* if it is over :data:`MAX_RECORD_BYTES`, its schema is nested
  deeper than :data:`MAX_SCHEMA_DEPTH` or is longer than :data:`MAX_SCHEMA_BYTES`, or it
  does not parse; these checks read bytes and count brackets, never recurse, so they give
  the same verdict in every reader whatever its stack depth, recursion limit or Python;
- the first record for a sane id, in log order, owns that id, refused or not; a later
  claim for it is ignored;
- a claim is accepted only if it is not refused, its version is exactly one past the
  subject's latest and its schema is not already registered under that subject (two
  registrars racing on one subject cannot both get "version 2", nor register one schema
  twice);
- every sane id is used up, accepted or not, so the next free id is the highest seen + 1.

A refused record is skipped with one warning naming its position and key; it still moves
"applied" on, and its id (if sane) still counts as used, in every reader alike. A reader
that cannot evaluate a record at all (a RecursionError or MemoryError inside the caps:
its own environment, not the record) raises and applies nothing past it, so it stops
rather than disagrees. :meth:`SchemaRegistry.register` judges its own claim by the same
rules before writing it, so it never writes a claim the readers would refuse.

A registrar whose claim lost starts over (re-checking compatibility against the new
latest). Each claim has its own key (id plus a random token): compaction keeps the *last*
record per key, so keying by id alone would let a losing claim replace the winner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import TopicPartition

from events.adapters import kafka

from events.schema.catalog import canonical_json
from events.schema.compatibility import check_backward
from events.errors import SchemaError, ServiceUnavailable
from events.settings import Settings

_log = logging.getLogger(__name__)

#: Lost races tolerated before register gives up; each loss means another registrar
#: made progress, so this only trips under pathological contention.
MAX_CLAIM_ATTEMPTS = 50

#: The highest schema id: Confluent's clients read the wire format's id as a signed 32-bit int.
MAX_SCHEMA_ID = 2**31 - 1
#: Deepest nesting of JSON arrays and objects in a schema (evp's own schemas reach 8).
MAX_SCHEMA_DEPTH = 32
#: Longest schema, as the UTF-8 bytes of its JSON text.
MAX_SCHEMA_BYTES = 256 * 1024
#: Longest log record (key plus value); under Kafka's default 1 MB message limit.
MAX_RECORD_BYTES = 1_000_000
#: Longest integer literal read from a record: bounds int() the same way on every Python
#: (3.11+ refuses over 4300 digits, older versions do not).
_MAX_INT_DIGITS = 20


class SchemaLog(Protocol):
    """An append-only, totally ordered log of (key, value) records."""

    def append(self, key: bytes, value: bytes) -> None:
        """Append one record; it is durable and visible to read_all when this returns."""

    def read_all(self) -> list[tuple[bytes, bytes]]:
        """Every record, in log order."""


def records_from(log: SchemaLog, start: int) -> list[tuple[bytes, bytes]]:
    """The records of ``log`` from position ``start`` on; only those if the log can say (``read_from``)."""
    read_from = getattr(log, "read_from", None)
    if callable(read_from):
        return list(read_from(start))
    return log.read_all()[start:]


class MemorySchemaLog:
    """A log in memory, shared by the registries of one process (for tests and tools)."""

    def __init__(self) -> None:
        self._records: list[tuple[bytes, bytes]] = []
        self._lock = threading.Lock()

    def append(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._records.append((bytes(key), bytes(value)))

    def read_all(self) -> list[tuple[bytes, bytes]]:
        with self._lock:
            return list(self._records)

    def read_from(self, start: int) -> list[tuple[bytes, bytes]]:
        with self._lock:
            return self._records[start:]


#: Nothing in the schema log may ever be removed (see :class:`KafkaSchemaLog`).
SCHEMA_TOPIC_CONFIGS = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}


class KafkaSchemaLog:
    """The log as a single-partition Kafka topic that keeps every record forever (created if missing).

    Not compacted: every claim has a key of its own, so compaction would save nothing, and a
    tombstone (or any record reusing a winning claim's key) would let compaction remove a
    winner that readers folded before it, after which readers disagree on ids.

    One partition gives the total order the id arbitration needs. Reads are incremental:
    records already read are kept, and each ``read_all`` fetches only up to the current
    end offset. Clients come from the Kafka adapter, so errors are translated there.

    A client that failed is closed and made again on the next call (the consumer seeking
    to the first record not yet read): a long-lived consumer that had lived through a broker
    restart and an outage was seen to answer every later poll with nothing while the end
    offset grew, so a process kept failing on schemas registered after it until restarted.
    """

    def __init__(self, settings: Settings, *, timeout_s: float = 15.0) -> None:
        self.settings, self.topic = settings, settings.schemas_topic
        self._timeout_ms = int(timeout_s * 1000)
        self._partition = TopicPartition(self.topic, 0)
        self._lock = threading.Lock()
        self._records: list[tuple[bytes, bytes]] = []
        self._next_offset: int | None = None  #: the offset after the last record read (None: none read)
        self._producer: Any = None
        self._consumer: Any = None
        kafka.ensure_topic(settings, self.topic, 1, SCHEMA_TOPIC_CONFIGS, enforce=True)

    def _timeouts(self) -> dict[str, Any]:
        return {"client_id": "evp-schema-registry", "bootstrap_timeout_ms": self._timeout_ms,
                "request_timeout_ms": self._timeout_ms}

    def append(self, key: bytes, value: bytes) -> None:
        with self._lock:
            try:
                if self._producer is None:
                    self._producer = kafka.producer(self.settings, linger_ms=0, max_block_ms=self._timeout_ms,
                                                    delivery_timeout_ms=max(2 * self._timeout_ms, 30_000),
                                                    **self._timeouts())
                with kafka.kafka_errors(self.settings):
                    future = self._producer.send(self.topic, key=key, value=value, partition=0)
                    self._producer.flush(timeout=self._timeout_ms / 1000)
                    future.get(timeout=self._timeout_ms / 1000)
            except BaseException:
                self._drop_producer()
                raise

    def read_all(self) -> list[tuple[bytes, bytes]]:
        return self.read_from(0)

    def read_from(self, start: int) -> list[tuple[bytes, bytes]]:
        """The records from position ``start`` on, after fetching those appended since the last read.

        1. without a consumer, make one and seek it past the last record read (to the
           beginning when none was);
        2. fetch up to the end offset the broker reports now; a poll that brings nothing
           before that end raises :class:`ServiceUnavailable`;
        3. on any failure the consumer is closed, so the next call starts again at 1.
        """
        with self._lock:
            try:
                self._catch_up()
            except BaseException:
                self._drop_consumer()
                raise
            return self._records[start:]

    def _catch_up(self) -> None:
        if self._consumer is None:
            self._consumer = kafka.consumer(self.settings, group_id=None, **self._timeouts())
            with kafka.kafka_errors(self.settings):
                self._consumer.assign([self._partition])
                if self._next_offset is None:
                    self._consumer.seek_to_beginning(self._partition)
                else:
                    self._consumer.seek(self._partition, self._next_offset)
        with kafka.kafka_errors(self.settings):
            end = self._consumer.end_offsets([self._partition], timeout_ms=self._timeout_ms)[self._partition]
            while self._consumer.position(self._partition, timeout_ms=self._timeout_ms) < end:
                batches = self._consumer.poll(timeout_ms=self._timeout_ms)
                if not batches:
                    raise ServiceUnavailable("kafka", kafka.where(self.settings),
                                             f"no records from {self.topic!r} before offset {end}")
                for records in batches.values():
                    self._records.extend((r.key or b"", r.value or b"") for r in records)
                    if records:
                        self._next_offset = records[-1].offset + 1

    def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):  # a broken client may fail to close; it is dropped all the same
                consumer.close()

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=0)

    def close(self) -> None:
        with self._lock:
            self._drop_producer()
            self._drop_consumer()


@dataclass(frozen=True)
class RegisteredSchema:
    """One version of a subject, in the shape of Confluent's registry."""

    id: int
    subject: str
    version: int
    schema: dict[str, Any]


class _Refused(Exception):
    """A record the fold skips; ``schema_id`` is its id if that is sane (it is used up all the same)."""

    def __init__(self, reason: str, schema_id: int | None = None) -> None:
        self.reason, self.schema_id = reason, schema_id
        super().__init__(reason)


_STRUCTURE = re.compile(r'["\[\]{}]')
_REST_OF_STRING = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_depth(text: str, limit: int = MAX_SCHEMA_DEPTH) -> int:
    """How deep arrays and objects nest in JSON ``text``, counted without recursion.

    Brackets inside strings do not count. One pass, each string matched once from its
    opening quote; counting stops at the first level past ``limit`` (the answer is then
    ``limit + 1``), so a hostile text costs linear time, never a deep stack. For text that
    is not JSON the count is at least as deep as a JSON parser gets before it fails.
    """
    deepest = depth = position = 0
    while (found := _STRUCTURE.search(text, position)) is not None:
        position, char = found.end(), found.group()
        if char == '"':
            rest = _REST_OF_STRING.match(text, position)
            if rest is None:
                break  # an unterminated string: nothing after it is structure
            position = rest.end()
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def value_depth(value: Any, limit: int = MAX_SCHEMA_DEPTH) -> int:
    """How deep lists and dicts nest in ``value``, walked without recursion; stops past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"integer literal of {len(literal)} digits")
    return int(literal)


def load_json(text: str, what: str) -> Any:
    """``json.loads`` with the caps checked first; SchemaError naming ``what`` if it breaks one or is not JSON.

    The depth is counted before parsing, so a hostile text never reaches a parser that
    recurses; numbers longer than 20 digits are refused, the same on every Python.
    """
    depth = json_depth(text)
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"{what} nests arrays and objects deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int)
    except ValueError as err:
        raise SchemaError(f"{what} is not JSON: {err}") from None


def check_caps(schema: Any) -> None:
    """Raise SchemaError if ``schema`` (a parsed value) is deeper or longer than the caps; never recurses."""
    if value_depth(schema) > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"the schema nests arrays and objects deeper than {MAX_SCHEMA_DEPTH} levels")
    size = len(schema_json(schema).encode())
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the schema is {size} bytes of JSON, over the {MAX_SCHEMA_BYTES}-byte cap")


def schema_json(schema: Any) -> str:
    """A schema as the JSON text a record carries (keys sorted, no spaces)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _judge(key: bytes, value: bytes, highest_id: int) -> tuple[RegisteredSchema, str]:
    """The entry a record claims and its canonical schema, or _Refused saying why.

    Only RecursionError and MemoryError escape otherwise: they say the reader could not
    evaluate the record, not that the record is bad, so the caller must not skip it.
    """
    if len(key) + len(value) > MAX_RECORD_BYTES:
        raise _Refused(f"{len(key) + len(value)} bytes, over the {MAX_RECORD_BYTES}-byte cap")
    try:
        raw = load_json(value.decode("utf-8"), "the record")
    except (UnicodeDecodeError, SchemaError) as err:
        raise _Refused(str(err)) from None
    if not isinstance(raw, dict):
        raise _Refused(f"the record is a JSON {type(raw).__name__}, not an object")
    schema_id = raw.get("id")
    if not _whole(schema_id, 1, MAX_SCHEMA_ID):
        raise _Refused(f"id {schema_id!r} is not a whole number in 1..{MAX_SCHEMA_ID}")
    assert isinstance(schema_id, int)
    if schema_id > highest_id + 1:
        raise _Refused(f"id {schema_id} skips ahead of the highest id so far, {highest_id}")
    subject, version, text = raw.get("subject"), raw.get("version"), raw.get("schema")
    try:
        if not isinstance(subject, str) or not subject:
            raise SchemaError(f"subject {subject!r} is not a non-empty string")
        if not _whole(version, 1, MAX_SCHEMA_ID):
            raise SchemaError(f"version {version!r} is not a whole number in 1..{MAX_SCHEMA_ID}")
        assert isinstance(version, int)
        if not isinstance(text, str):
            raise SchemaError(f"schema is a {type(text).__name__}, not a string of JSON")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_SCHEMA_BYTES:
            raise SchemaError(f"the schema is {size} bytes of JSON, over the {MAX_SCHEMA_BYTES}-byte cap")
        schema = load_json(text, "the schema")
        canonical = canonical_json(schema)
    except (RecursionError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - whatever the parser raises, every reader raises it alike
        raise _Refused(str(err) if isinstance(err, SchemaError) else f"{type(err).__name__}: {err}",
                       schema_id) from None
    return RegisteredSchema(id=schema_id, subject=subject, version=version, schema=schema), canonical


@dataclass
class _RegistryState:
    """The log folded by the arbitration rules; identical in every reader."""

    by_id: dict[int, RegisteredSchema] = field(default_factory=dict)
    versions: dict[str, list[RegisteredSchema]] = field(default_factory=dict)
    ids_by_schema: dict[tuple[str, str], int] = field(default_factory=dict)
    winning_keys: dict[int, bytes] = field(default_factory=dict)
    highest_id: int = 0
    applied: int = 0

    def apply(self, key: bytes, value: bytes) -> None:
        """Fold one record: 1. judge it (this may raise, changing nothing); 2. count it as
        applied; 3. use up its id if sane; 4. record the claim if it is the first for its id
        and not refused; 5. accept it if it is the subject's next version and a new schema.
        """
        position = self.applied
        try:
            entry, canonical = _judge(key, value, self.highest_id)
        except _Refused as refused:
            self.applied += 1
            _log.warning("schema log record #%d (key %.80r) ignored: %s", position, key, refused.reason)
            if refused.schema_id is not None:
                self.highest_id = max(self.highest_id, refused.schema_id)
                self.winning_keys.setdefault(refused.schema_id, key)
            return
        except (RecursionError, MemoryError) as err:
            raise SchemaError(f"schema log record #{position} (key {key[:80]!r}) could not be evaluated here "
                              f"({type(err).__name__}); nothing from it on is applied") from err
        self.applied += 1
        self.highest_id = max(self.highest_id, entry.id)
        if entry.id in self.winning_keys:
            return
        self.winning_keys[entry.id] = key
        history = self.versions.setdefault(entry.subject, [])
        if entry.version != len(history) + 1 or (entry.subject, canonical) in self.ids_by_schema:
            return
        history.append(entry)
        self.by_id[entry.id] = entry
        self.ids_by_schema[(entry.subject, canonical)] = entry.id

    def accepted(self, schema_id: int, key: bytes) -> bool:
        return schema_id in self.by_id and self.winning_keys.get(schema_id) == key

    def latest(self, subject: str) -> RegisteredSchema | None:
        history = self.versions.get(subject)
        return history[-1] if history else None


def _encode_record(entry: RegisteredSchema) -> bytes:
    return json.dumps({
        "id": entry.id,
        "subject": entry.subject,
        "version": entry.version,
        "schema": schema_json(entry.schema),
    }, sort_keys=True).encode()


class SchemaRegistry:
    """Registers schema versions under subjects and resolves global ids, over a SchemaLog."""

    def __init__(self, log: SchemaLog, *, refresh_interval_s: float = 0.0) -> None:
        """``refresh_interval_s`` lets reads of subjects and versions answer from the folded
        state if the log was read that recently (a server's many readers share one read);
        register, lookup and an unknown id always read what is new.
        """
        self._log = log
        self._state = _RegistryState()
        self._lock = threading.RLock()
        self._refresh_interval_s = refresh_interval_s
        self._refreshed_at = float("-inf")

    def _refresh(self) -> _RegistryState:
        for key, value in records_from(self._log, self._state.applied):
            self._state.apply(key, value)
        self._refreshed_at = time.monotonic()
        return self._state

    def _recent(self) -> _RegistryState:
        if time.monotonic() - self._refreshed_at < self._refresh_interval_s:
            return self._state
        return self._refresh()

    @property
    def position(self) -> int:
        """How many log records this registry has folded (applied or skipped)."""
        return self._state.applied

    @property
    def highest_id(self) -> int:
        """The highest id used up so far: the next claim is for this + 1."""
        return self._state.highest_id

    def ids(self) -> dict[int, RegisteredSchema]:
        """Every accepted schema by id, after reading what is new."""
        with self._lock:
            return dict(self._refresh().by_id)

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """The id of ``schema`` under ``subject``, registering it as a new version if needed.

        1. Refuse (SchemaError, nothing written) a schema over the caps or not valid Avro.
        2. Read what is new; a schema already registered under the subject keeps its id.
        3. Check the new version is BACKWARD compatible with the subject's versions (it must
           read all of them: old events stay in the log); IncompatibleSchema if not.
        4. Judge the claim for the next id by the fold's own rules (SchemaError if the
           readers would refuse it, or if ids are used up), append it and re-read; if
           another registrar's claim won, start over from 2.
        """
        if not subject:
            raise SchemaError("a subject name must not be empty")
        check_caps(schema)
        canonical = canonical_json(schema)
        with self._lock:
            known = self._state.ids_by_schema.get((subject, canonical))
            if known is not None:
                return known
            for _ in range(MAX_CLAIM_ATTEMPTS):
                state = self._refresh()
                known = state.ids_by_schema.get((subject, canonical))
                if known is not None:
                    return known
                latest = state.latest(subject)
                for version in state.versions.get(subject, ()):
                    check_backward(subject, schema, version.schema)
                if state.highest_id >= MAX_SCHEMA_ID:
                    raise SchemaError(f"cannot register under {subject!r}: every schema id up to {MAX_SCHEMA_ID} is used")
                claim = RegisteredSchema(id=state.highest_id + 1, subject=subject,
                                         version=1 if latest is None else latest.version + 1, schema=schema)
                key = json.dumps({"id": claim.id, "claim": uuid.uuid4().hex}, sort_keys=True).encode()
                value = _encode_record(claim)
                try:
                    _judge(key, value, state.highest_id)
                except _Refused as refused:
                    raise SchemaError(f"cannot register under {subject!r}: "
                                      f"the registry's readers would refuse the claim: {refused.reason}") from None
                self._log.append(key, value)
                if self._refresh().accepted(claim.id, key):
                    return claim.id
        raise SchemaError(f"could not register a schema under {subject!r}: "
                          f"lost {MAX_CLAIM_ATTEMPTS} races for an id to other registrars")

    def lookup(self, subject: str, schema: dict[str, Any]) -> int | None:
        """The id of ``schema`` under ``subject`` if it is registered there, else None; never writes."""
        check_caps(schema)
        canonical = canonical_json(schema)
        with self._lock:
            known = self._state.ids_by_schema.get((subject, canonical))
            return known if known is not None else self._refresh().ids_by_schema.get((subject, canonical))

    def get(self, schema_id: int) -> RegisteredSchema:
        """The schema with this global id; re-reads the log once if it is not known yet."""
        with self._lock:
            found = self._state.by_id.get(schema_id)
            if found is None and _whole(schema_id, 1, MAX_SCHEMA_ID):
                found = self._refresh().by_id.get(schema_id)
        if found is None:
            raise SchemaError(f"schema id {schema_id} is not registered")
        return found

    def latest(self, subject: str) -> RegisteredSchema | None:
        """The newest version under ``subject``, or None if it has none."""
        with self._lock:
            return self._recent().latest(subject)

    def versions(self, subject: str) -> tuple[RegisteredSchema, ...]:
        """Every version under ``subject``, oldest first."""
        with self._lock:
            return tuple(self._recent().versions.get(subject, ()))

    def subjects(self) -> tuple[str, ...]:
        """Every subject with at least one version, sorted (a lost claim leaves none)."""
        with self._lock:
            return tuple(sorted(s for s, history in self._recent().versions.items() if history))
