"""The poison fuzzer and its oracle: mutated records written straight to the events topic among valid ones.

:class:`Fuzzer` turns valid records (:class:`Template`: events as the relay published them)
into mutated ones, one of :data:`KINDS` each, from a seeded generator alone: the same seed
and the same templates give the same records. :func:`run` is the whole trial, shared by the
short form (``tests/faults/test_poison_fuzz.py``) and the full one (``bench/poison.py``):

1. two ``python -m projections.cli run samples --scale-out`` processes start and share the
   topic's partitions (both must hold leases before anything is written);
2. rounds, until ``records`` mutated records are sent: valid events are appended through the
   SDK and published, then about as many mutated records are sent straight to the events
   topic, each made from a record already published;
3. once both runners have caught up, the oracle (:meth:`Report.problems`) demands: every
   mutated record dead-lettered exactly once, naming its source partition and offset, at
   the stage and with a reason of its kind; no other record dead-lettered; the view equal
   to an independent fold of the valid records alone (:class:`ExpectedSamples`), with each
   valid stream at its last version; both runners still running;
4. ``dlq list`` shows every mutated record as dead, and ``dlq replay --all`` re-drives them
   all: none of their causes is fixed, so each fails again with exactly one new letter
   (``attempts`` 1), nothing loops, and the view is unchanged;
5. the runners stop on SIGTERM with exit status 0, and together applied every valid event.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
from fastavro import parse_schema, schemaless_reader
from kafka.admin import ConfigResource

from events.adapters.kafka import admin, ensure_event_topics, producer
from events.event import HEADER_EVENT_ID, HEADER_STREAM_VERSION, RecordedEvent, kafka_headers
from events.schema.codec import encode_value
from events.schema.registry import MAX_SCHEMA_ID
from events.settings import Settings
from events.store.client import EventStore
from projections.deadletter import MAX_LETTER_BYTES, STAGE_APPLY, STAGE_CONFLICT, STAGE_DECODE, read_dead_letters
from projections.leases import MEMBER, lease_class
from projections.runner import projection_lag
from tests.support.views import SAMPLES_SCHEMA, ExpectedSamples, at, random_op, sample_rows

REPO = Path(__file__).resolve().parents[2]
VIEW = "samples"

TRUNCATED = "truncated"
BIT_FLIPPED = "bit-flipped"
WRONG_SCHEMA_ID = "wrong schema id"
UNKNOWN_SCHEMA = "unknown schema"
FOREIGN_SCHEMA = "another topic's schema"
OVERSIZED = "oversized"
MISSING_HEADERS = "missing evp headers"
CONFLICTING_DUPLICATE = "duplicate, other payload"
KINDS = (TRUNCATED, BIT_FLIPPED, WRONG_SCHEMA_ID, UNKNOWN_SCHEMA, FOREIGN_SCHEMA, OVERSIZED, MISSING_HEADERS,
         CONFLICTING_DUPLICATE)
#: How often each kind is drawn, relative to the others: an oversized record is about 1 MB.
WEIGHTS = {kind: 1 if kind == OVERSIZED else 10 for kind in KINDS}
#: Over the runner's fetch size per partition (8 MiB, events.adapters.kafka.consumer).
HUGE_BYTES = 9 * 1024 * 1024

#: kind -> (the stages its letter may name, words one of which its reason must contain)
EXPECTED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    TRUNCATED: ((STAGE_DECODE,), ("Avro body unreadable", "shorter than the", "unread bytes")),
    BIT_FLIPPED: ((STAGE_DECODE,), ("magic byte", "not in the registry", "unreadable", "unread bytes",
                                    "writer schema unusable", "not a record schema", "is registered under subject")),
    WRONG_SCHEMA_ID: ((STAGE_DECODE,), ("unreadable", "unread bytes")),
    UNKNOWN_SCHEMA: ((STAGE_DECODE,), ("not in the registry",)),
    FOREIGN_SCHEMA: ((STAGE_DECODE,), ("is registered under subject",)),
    OVERSIZED: ((STAGE_DECODE, STAGE_APPLY), ("unread bytes", "Character", "0x00", "NUL")),
    MISSING_HEADERS: ((STAGE_DECODE,), ("missing or malformed evp headers", "stream versions start at 1")),
    CONFLICTING_DUPLICATE: ((STAGE_CONFLICT,), ("conflicting duplicate",)),
}

INTRUDER = {"type": "record", "name": "Intruder", "namespace": "fuzz",
            "fields": [{"name": "sample_id", "type": "string"}, {"name": "note", "type": "string"}]}

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class Template:
    """A valid record as published: what a mutation starts from."""

    key: bytes
    value: bytes
    headers: Headers
    event_type: str  #: the short name (``SampleSubmitted``)
    data: Mapping[str, Any]
    version: int


@dataclass(frozen=True)
class Mutated:
    kind: str
    variant: str
    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass(frozen=True)
class Schemas:
    """What the fuzzer knows of the registry: every schema by id, the topic's own ids, the foreign ones."""

    parsed: Mapping[int, Any]
    topic_ids: tuple[int, ...]
    intruder: int  #: an Intruder registered for another topic
    foreign_samples: int  #: digits.SampleSubmitted registered for another topic
    highest: int


class Fuzzer:
    """Mutated records from valid ones (the module docstring), deterministic given the seed.

    ``encode(event_type, datum)`` frames a valid event of the topic (the SDK's codec).
    A bit flip or a wrong id that still decodes under a registered schema is a different,
    well-formed record (nothing below Kafka's own CRC could tell): it is drawn again, and
    :attr:`redraws` counts it.
    """

    def __init__(self, seed: int, schemas: Schemas, encode: Callable[[str, Mapping[str, Any]], bytes]) -> None:
        self.rng = random.Random(seed)
        self.schemas, self.encode = schemas, encode
        self.redraws: Counter[str] = Counter()
        self.made = 0

    # -- the independent judge ------------------------------------------------------------
    def decodes(self, value: bytes | None) -> bool:
        """Whether ``value`` is a whole, framed Avro record of some registered schema (fastavro alone)."""
        if value is None or len(value) < 5 or value[0] != 0:
            return False
        parsed = self.schemas.parsed.get(int.from_bytes(value[1:5], "big"))
        if parsed is None:
            return False
        body = io.BytesIO(value[5:])
        try:
            datum = schemaless_reader(body, parsed, None)
        except Exception:  # noqa: BLE001 - any failure to read is what we want
            return False
        return body.tell() == len(value) - 5 and isinstance(datum, dict)

    # -- drawing ----------------------------------------------------------------------------
    def next(self, templates: Sequence[Template]) -> Mutated:
        """One mutated record of a kind drawn by :data:`WEIGHTS`, from a template drawn among ``templates``."""
        kind = self.rng.choices(KINDS, weights=[WEIGHTS[k] for k in KINDS])[0]
        return self.make(kind, templates)

    def make(self, kind: str, templates: Sequence[Template]) -> Mutated:
        for _ in range(100):
            made = _MAKERS[kind](self, self.rng.choice(templates))
            if made is not None and (kind in (OVERSIZED, CONFLICTING_DUPLICATE, FOREIGN_SCHEMA, MISSING_HEADERS)
                                     or not self.decodes(made.value)):
                self.made += 1
                return made
            self.redraws[kind] += 1
        raise AssertionError(f"no {kind} record after 100 draws")

    def huge(self, template: Template) -> Mutated:
        """A record over the runner's fetch size (the topic's limit must allow it)."""
        self.made += 1
        return Mutated(OVERSIZED, "over the fetch size", template.key, _padded(self.rng, template.value, HUGE_BYTES),
                       template.headers)

    # -- the kinds --------------------------------------------------------------------------
    def truncated(self, t: Template) -> Mutated:
        cut = self.rng.randrange(len(t.value))
        return Mutated(TRUNCATED, "in the header" if cut < 5 else "in the body", t.key, t.value[:cut], t.headers)

    def bit_flipped(self, t: Template) -> Mutated:
        value = bytearray(t.value)
        places = [self.rng.randrange(len(value)) for _ in range(self.rng.randint(1, 3))]
        for place in places:
            value[place] ^= 1 << self.rng.randrange(8)
        return Mutated(BIT_FLIPPED, "in the header" if min(places) < 5 else "in the body", t.key, bytes(value),
                       t.headers)

    def wrong_schema_id(self, t: Template) -> Mutated | None:
        own = int.from_bytes(t.value[1:5], "big")
        others = [i for i in self.schemas.topic_ids if i != own]
        if not others:
            return None
        other = self.rng.choice(others)
        return Mutated(WRONG_SCHEMA_ID, f"id {other}", t.key, t.value[:1] + other.to_bytes(4, "big") + t.value[5:],
                       t.headers)

    def unknown_schema(self, t: Template) -> Mutated:
        variant, schema_id = self.rng.choice((
            ("id 0", 0),
            ("far past the highest id", self.schemas.highest + 1_000_000 + self.rng.randrange(1_000_000)),
            ("the highest sane id", MAX_SCHEMA_ID - self.rng.randrange(16)),
            ("over 2^31", 0xFFFFFFFF - self.rng.randrange(1000)),
        ))
        return Mutated(UNKNOWN_SCHEMA, variant, t.key, t.value[:1] + schema_id.to_bytes(4, "big") + t.value[5:],
                       t.headers)

    def foreign_schema(self, t: Template) -> Mutated:
        if t.event_type == "SampleSubmitted" and self.rng.random() < 0.5:
            value = t.value[:1] + self.schemas.foreign_samples.to_bytes(4, "big") + t.value[5:]
            return Mutated(FOREIGN_SCHEMA, "SampleSubmitted of another topic", t.key, value, t.headers)
        datum = {"sample_id": str(t.data.get("sample_id", "")), "note": f"intruder {self.rng.randrange(10**6)}"}
        value = encode_value(self.schemas.intruder, self.schemas.parsed[self.schemas.intruder], datum)
        return Mutated(FOREIGN_SCHEMA, "Intruder of another topic", t.key, value, t.headers)

    def oversized(self, t: Template) -> Mutated:
        size = self.rng.randrange(MAX_LETTER_BYTES + 1, 1_040_000)
        if self.rng.random() < 0.5:
            return Mutated(OVERSIZED, "junk tail", t.key, _padded(self.rng, t.value, size), t.headers)
        sample = f"poison-{self.rng.getrandbits(48):012x}"
        datum = {"sample_id": sample, "annotator_id": "fuzz", "features": [0.0] * 64, "label": 1,
                 "source": "\x00" + "x" * (size - 400)}
        headers = ((HEADER_EVENT_ID, str(self._uuid()).encode()), (HEADER_STREAM_VERSION, b"1"))
        return Mutated(OVERSIZED, "NUL in a text column", f"sample-{sample}".encode(), self.encode("SampleSubmitted", datum),
                       headers)

    def missing_headers(self, t: Template) -> Mutated:
        variant, headers = self.rng.choice((
            ("no event id", _without(t.headers, HEADER_EVENT_ID)),
            ("no stream version", _without(t.headers, HEADER_STREAM_VERSION)),
            ("no evp headers", tuple((k, v) for k, v in t.headers if not k.startswith("evp."))),
            ("no headers", ()),
            ("version 0", _with(t.headers, HEADER_STREAM_VERSION, b"0")),
            ("negative version", _with(t.headers, HEADER_STREAM_VERSION, f"-{self.rng.randint(1, 99)}".encode())),
            ("version not a number", _with(t.headers, HEADER_STREAM_VERSION, b"v" + str(t.version).encode())),
            ("event id not a UUID", _with(t.headers, HEADER_EVENT_ID, b"not-a-uuid")),
        ))
        return Mutated(MISSING_HEADERS, variant, t.key, t.value, headers)

    def conflicting_duplicate(self, t: Template) -> Mutated | None:
        sample = str(t.data.get("sample_id", ""))
        event_type = self.rng.choice(("SampleSubmitted", "LabelCorrected", "SampleRetracted"))
        datum: dict[str, Any] = {"sample_id": sample, "annotator_id": "a1"}
        if event_type == "SampleSubmitted":
            datum |= {"features": [float(self.rng.randrange(17)) for _ in range(64)], "label": self.rng.randrange(10),
                      "source": f"forged:{self.rng.randrange(10**6)}"}
        elif event_type == "LabelCorrected":
            datum |= {"previous_label": 0, "label": self.rng.randrange(10), "reason": "forged"}
        else:
            datum |= {"reason": f"forged {self.rng.randrange(10**6)}"}
        value = self.encode(event_type, datum)
        if value == t.value:
            return None
        if self.rng.random() < 0.5:
            return Mutated(CONFLICTING_DUPLICATE, "same event id", t.key, value, t.headers)
        return Mutated(CONFLICTING_DUPLICATE, "new event id", t.key, value,
                       _with(t.headers, HEADER_EVENT_ID, str(self._uuid()).encode()))

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)


_MAKERS: dict[str, Callable[[Fuzzer, Template], Mutated | None]] = {
    TRUNCATED: Fuzzer.truncated, BIT_FLIPPED: Fuzzer.bit_flipped, WRONG_SCHEMA_ID: Fuzzer.wrong_schema_id,
    UNKNOWN_SCHEMA: Fuzzer.unknown_schema, FOREIGN_SCHEMA: Fuzzer.foreign_schema, OVERSIZED: Fuzzer.oversized,
    MISSING_HEADERS: Fuzzer.missing_headers, CONFLICTING_DUPLICATE: Fuzzer.conflicting_duplicate,
}


def _padded(rng: random.Random, value: bytes, size: int) -> bytes:
    return value + rng.randbytes(max(0, size - len(value)))


def _without(headers: Headers, name: str) -> Headers:
    return tuple((k, v) for k, v in headers if k != name)


def _with(headers: Headers, name: str, value: bytes) -> Headers:
    return tuple((k, value if k == name else v) for k, v in headers)


def schemas_of(store: EventStore, settings: Settings) -> Schemas:
    """Register the foreign schemas (subjects of a topic that is not the events topic) and read every schema back."""
    registry = store.codec.registry
    elsewhere = f"{settings.topic_prefix}.elsewhere"
    intruder = registry.register(f"{elsewhere}-fuzz.Intruder", INTRUDER)
    foreign_samples = registry.register(f"{elsewhere}-digits.SampleSubmitted",
                                        store.codec.catalog.wire_schema("digits.SampleSubmitted"))
    parsed: dict[int, Any] = {}
    topic_ids: list[int] = []
    for subject in registry.subjects():
        for version in registry.versions(subject):
            parsed[version.id] = parse_schema(version.schema)
            if subject.startswith(f"{settings.events_topic}-"):
                topic_ids.append(version.id)
    return Schemas(parsed, tuple(sorted(topic_ids)), intruder, foreign_samples, max(parsed))


# -- the trial ------------------------------------------------------------------------------
@dataclass
class Sent:
    """A mutated record on the topic."""

    mutated: Mutated
    partition: int
    offset: int


@dataclass
class Report:
    """What a trial did and saw; :meth:`problems` is the oracle's verdict."""

    seed: int
    sent: list[Sent] = field(default_factory=list)
    valid: int = 0
    redraws: Counter[str] = field(default_factory=Counter)
    letters: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    view_problem: str = ""
    versions_problem: str = ""
    runners_alive: bool = False
    runner_exits: list[int | None] = field(default_factory=list)
    applied: int = 0
    skipped: int = 0
    runner_dead_lettered: int = 0
    leases: dict[int, int] = field(default_factory=dict)
    listed: dict[str, Any] = field(default_factory=dict)
    replayed: dict[str, Any] = field(default_factory=dict)
    replay_rc: int | None = None
    letters_after_replay: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    view_after_replay: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def by_kind(self) -> Counter[str]:
        return Counter(s.mutated.kind for s in self.sent)

    def dead_lettered(self, kind: str | None = None) -> int:
        """Mutated records (of ``kind``) with exactly one letter, at an expected stage, with an expected reason."""
        return sum(1 for s in self.sent if (kind is None or s.mutated.kind == kind) and not self._wrong(s))

    def _wrong(self, sent: Sent) -> str:
        letters = self.letters.get((sent.partition, sent.offset), [])
        if len(letters) != 1:
            return f"{len(letters)} letters"
        stages, words = EXPECTED[sent.mutated.kind]
        letter = letters[0]
        if letter.stage not in stages or not any(w in letter.reason for w in words):
            return f"stage {letter.stage!r}, reason {letter.reason!r}"
        if sent.mutated.kind == OVERSIZED and "value" not in letter.omitted:
            return f"a letter of {len(letter.value or b'')} bytes kept the value"
        return ""

    def problems(self) -> list[str]:
        """Everything the oracle found wrong (empty: the trial passed)."""
        found: list[str] = []
        wrong = [(s, self._wrong(s)) for s in self.sent]
        for sent, why in [(s, w) for s, w in wrong if w][:10]:
            found.append(f"{sent.mutated.kind} ({sent.mutated.variant}) at partition {sent.partition} offset "
                         f"{sent.offset}: {why}")
        if sum(1 for _, w in wrong if w) > 10:
            found.append(f"... {sum(1 for _, w in wrong if w) - 10} more mutated records not dead-lettered once as expected")
        mutated = {(s.partition, s.offset) for s in self.sent}
        valid_dead = sorted(set(self.letters) - mutated)
        if valid_dead:
            found.append(f"{len(valid_dead)} records that were not mutated were dead-lettered, first at "
                         f"partition/offset {valid_dead[0]}: {self.letters[valid_dead[0]][0].reason}")
        for problem in (self.view_problem, self.versions_problem, self.view_after_replay):
            if problem:
                found.append(problem)
        if not self.runners_alive:
            found.append("a runner stopped during the fuzz")
        if self.runner_exits != [0, 0]:
            found.append(f"the runners exited {self.runner_exits} on SIGTERM, not [0, 0]")
        if len(set(self.leases.values())) != 2:
            found.append(f"the two runners did not share the partitions: leases {self.leases}")
        if self.applied != self.valid:
            found.append(f"the runners applied {self.applied} records, the valid ones are {self.valid}")
        found += self._dlq_problems(mutated)
        return found

    def _dlq_problems(self, mutated: set[tuple[int, int]]) -> list[str]:
        found = []
        listed = {(r["source_partition"], r["source_offset"]): r for r in self.listed.get("records", [])}
        if set(listed) != mutated or any(r["state"] != "dead" for r in listed.values()):
            found.append(f"dlq list shows {len(listed)} records ({Counter(r['state'] for r in listed.values())}), "
                         f"the mutated are {len(mutated)}")
        if self.replay_rc != 1 or self.replayed.get("failed", 0) + self.replayed.get("conflict", 0) != len(mutated):
            found.append(f"dlq replay --all exited {self.replay_rc}: {self._replay_counts()}; expected every one of "
                         f"{len(mutated)} to fail again")
        again = {place: letters for place, letters in self.letters_after_replay.items() if place in mutated}
        if any(len(again.get(place, [])) != 2 or again[place][-1].attempts != 1 for place in mutated) or \
                len(self.letters_after_replay) != len(again):
            found.append("after the replay, not every mutated record has exactly its first letter and one new one "
                         "(attempts 1)")
        return found

    def _replay_counts(self) -> str:
        return ", ".join(f"{k} {self.replayed.get(k, 0):,}" for k in ("applied", "duplicate", "failed", "conflict", "unavailable"))

    def table(self) -> str:
        """The trial as one markdown table, then the totals."""
        kinds = self.by_kind()
        lines = ["| kind | records | dead-lettered once, reason of its kind | stages | redrawn | variants |",
                 "|---|---:|---:|---|---:|---|"]
        for kind in KINDS:
            stages = Counter(letter.stage for s in self.sent if s.mutated.kind == kind
                             for letter in self.letters.get((s.partition, s.offset), []))
            variants = Counter(s.mutated.variant for s in self.sent if s.mutated.kind == kind)
            lines.append(f"| {kind} | {kinds[kind]:,} | {self.dead_lettered(kind):,} | {_counts(stages) or '-'} | "
                         f"{self.redraws[kind]:,} | {_counts(variants)} |")
        mutated = {(s.partition, s.offset) for s in self.sent}
        lines.append(f"| **all mutated** | **{len(self.sent):,}** | **{self.dead_lettered():,}** | | "
                     f"{sum(self.redraws.values()):,} | |")
        lines += [
            "",
            "| | |", "|---|---|",
            f"| valid records (SDK) | {self.valid:,} |",
            f"| applied by the two runners | {self.applied:,} ({self.skipped:,} skipped as duplicates) |",
            f"| valid records dead-lettered | {len(set(self.letters) - mutated):,} |",
            f"| view equals the fold of the valid records | {'yes' if not self.view_problem else 'NO'} |",
            f"| runners | {'both ran throughout' if self.runners_alive else 'one STOPPED'}; SIGTERM exits "
            f"{self.runner_exits} |",
            f"| dlq list | {len(self.listed.get('records', [])):,} dead records |",
            f"| dlq replay --all | {self._replay_counts()}; view {'unchanged' if not self.view_after_replay else 'CHANGED'} |",
            "| wall time | " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()) + " |",
        ]
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in sorted(counter.items()))


def run(settings: Settings, *, records: int, seed: int, logs: Path, huge: int = 1, valid_ratio: float = 1.0,
        round_size: int = 250, batch_size: int = 1000, timeout_s: float = 600.0) -> Report:
    """The trial of the module docstring on ``settings`` (a private database and topic prefix)."""
    report = Report(seed)
    rng = random.Random(seed ^ 0x5EED)
    started = time.monotonic()
    logs.mkdir(parents=True, exist_ok=True)
    ensure_event_topics(settings)
    if huge:
        limit_messages(settings, settings.events_topic, HUGE_BYTES + 1024 * 1024)
    runners = [_start_runner(settings, logs / f"runner-{i}.log", batch_size) for i in range(2)]
    try:
        with EventStore.open(settings) as store:
            expected = ExpectedSamples()
            templates = _append_valid(store, expected, rng, round_size, 0)  # the topic holds events before any poison
            fuzzer = Fuzzer(seed, schemas_of(store, settings), lambda t, d: store.codec.encode(t, d).value)
            report.leases = _wait_for_leases(settings, runners, logs, timeout_s)
            report.seconds["setup"] = time.monotonic() - started
            kafka = producer(settings, max_request_size=HUGE_BYTES + 1024 * 1024, linger_ms=20)
            huge_rounds = set(rng.sample(range(max(1, records // round_size)), min(huge, max(1, records // round_size))))
            fuzzing = time.monotonic()
            round_ = 0
            while len(report.sent) < records:
                if round_:
                    templates += _append_valid(store, expected, rng, max(1, int(round_size * valid_ratio)), round_)
                batch = [fuzzer.next(templates) for _ in range(min(round_size, records - len(report.sent)))]
                if round_ in huge_rounds and huge:
                    batch[rng.randrange(len(batch))] = fuzzer.huge(rng.choice(templates))
                futures = [(m, kafka.send(settings.events_topic, key=m.key, value=m.value, headers=list(m.headers)))
                           for m in batch]
                kafka.flush()
                report.sent += [Sent(m, md.partition, md.offset) for m, f in futures for md in [f.get(timeout=60)]]
                round_ += 1
            kafka.close()
            report.valid = sum(expected.versions.values())
            report.redraws = fuzzer.redraws
            report.seconds["fuzz"] = time.monotonic() - fuzzing
            waiting = time.monotonic()
            _wait_caught_up(settings, runners, logs, timeout_s)
            report.seconds["catch-up after the last record"] = time.monotonic() - waiting
            report.runners_alive = all(p.poll() is None for p in runners)
            report.letters = _letters(settings)
            report.view_problem = _compare(settings, expected, "view")
            report.versions_problem = _versions(settings, expected)
            dlq = time.monotonic()
            rc, out = _cli(settings, "dlq", "list", VIEW, "--json")
            report.listed = json.loads(out) if rc == 0 else {}
            report.replay_rc, out = _cli(settings, "dlq", "replay", VIEW, "--all", "--json")
            report.replayed = json.loads(out) if out.strip().startswith("{") else {}
            report.letters_after_replay = _letters(settings)
            report.view_after_replay = _compare(settings, expected, "view after the replay")
            report.seconds["dlq list + replay"] = time.monotonic() - dlq
            report.runners_alive = report.runners_alive and all(p.poll() is None for p in runners)
    finally:
        for proc in runners:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in runners:
            try:
                report.runner_exits.append(proc.wait(timeout=60))
            except subprocess.TimeoutExpired:
                proc.kill()
                report.runner_exits.append(None)
    for i in range(len(runners)):
        totals = re.findall(r"stopped after (\d+) applied, (\d+) skipped, (\d+) dead-lettered",
                            (logs / f"runner-{i}.log").read_text())
        if totals:
            applied, skipped, dead = map(int, totals[-1])
            report.applied += applied
            report.skipped += skipped
            report.runner_dead_lettered += dead
    report.seconds["total"] = time.monotonic() - started
    return report


def _append_valid(store: EventStore, expected: ExpectedSamples, rng: random.Random, count: int,
                  round_: int) -> list[Template]:
    """``count`` random operations on a pool of samples, appended per stream and published; their templates."""
    per_stream: dict[str, list[Any]] = {}
    for n in range(count):
        stream, event = random_op(rng, expected, f"r{round_ % 8}-", 60, n)
        event = replace(event, event_id=uuid.UUID(int=rng.getrandbits(128), version=4), occurred_at=at(round_ * 10_000 + n))
        per_stream.setdefault(stream, []).append(event)
    positions: list[int] = []
    for stream, events in per_stream.items():
        positions += store.append(stream, events).positions
        for event in events:
            expected.fold(stream, event.type, event.data, event.occurred_at)
    store.flush()
    events = {e.event_id: e for batch in per_stream.values() for e in batch}
    return [_template(r, events[r.event_id].data) for r in store.ledger.read_positions(positions)]


def _template(recorded: RecordedEvent, data: Mapping[str, Any]) -> Template:
    return Template(recorded.stream_id.encode(), recorded.value, tuple(kafka_headers(recorded)),
                    recorded.event_type.rsplit(".", 1)[-1], data, recorded.version)


def limit_messages(settings: Settings, topic: str, size: int) -> None:
    """Set ``topic``'s largest message to ``size`` bytes (``max.message.bytes``; Kafka's default is about 1 MB)."""
    client = admin(settings)
    try:
        client.alter_configs([ConfigResource("topic", topic, configs={"max.message.bytes": str(size)})], incremental=True)
    finally:
        client.close()


def _start_runner(settings: Settings, log: Path, batch_size: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "projections.cli", "run", VIEW, "--scale-out", "--batch-size", str(batch_size)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def _cli(settings: Settings, *argv: str) -> tuple[int, str]:
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "projections.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode not in (0, 1) or (done.returncode == 1 and not done.stdout.strip()):
        raise AssertionError(f"projections.cli {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.returncode, done.stdout


def _check_alive(runners: Sequence[subprocess.Popen[bytes]], logs: Path) -> None:
    for i, proc in enumerate(runners):
        if proc.poll() is not None:
            raise AssertionError(f"runner {i} exited {proc.returncode}:\n{(logs / f'runner-{i}.log').read_text()[-3000:]}")


def _wait_for_leases(settings: Settings, runners: Sequence[subprocess.Popen[bytes]], logs: Path,
                     timeout_s: float) -> dict[int, int]:
    """partition -> backend pid holding its lease, once both runners hold a share of every partition."""
    deadline = time.monotonic() + timeout_s
    while True:
        _check_alive(runners, logs)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT objid::int, pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s::oid"
                " AND objsubid = 2 AND objid <> %s::oid", (lease_class(SAMPLES_SCHEMA), MEMBER & 0xFFFFFFFF)).fetchall()
        leases = {int(p): int(pid) for p, pid in rows}
        if len(leases) == settings.partitions and len(set(leases.values())) == 2:
            return leases
        if time.monotonic() > deadline:
            raise AssertionError(f"the two runners did not share the partitions within {timeout_s:.0f}s: {leases}")
        time.sleep(0.1)


def _wait_caught_up(settings: Settings, runners: Sequence[subprocess.Popen[bytes]], logs: Path,
                    timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        _check_alive(runners, logs)
        lags = projection_lag(settings, SAMPLES_SCHEMA)
        if lags and all(l.lag == 0 for l in lags):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the runners did not catch up within {timeout_s:.0f}s: {lags}")
        time.sleep(0.2)


def _letters(settings: Settings) -> dict[tuple[int, int], list[Any]]:
    """The view's letters by source (partition, offset), in letter order."""
    grouped: dict[tuple[int, int], list[Any]] = {}
    for letter in read_dead_letters(settings, settings.dead_letter_topic, projection=VIEW, timeout_s=60):
        grouped.setdefault((letter.source_partition, letter.source_offset), []).append(letter)
    return grouped


def _compare(settings: Settings, expected: ExpectedSamples, what: str) -> str:
    """Why the view differs from the independent fold, or ''."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        actual = sample_rows(conn)
    missing = sorted(set(expected.rows) - set(actual))
    extra = sorted(set(actual) - set(expected.rows))
    wrong = sorted(k for k in set(expected.rows) & set(actual) if expected.rows[k] != actual[k])
    if not (missing or extra or wrong):
        return ""
    return (f"{what} differs from the fold of the valid records: {len(missing)} rows missing {missing[:3]}, "
            f"{len(extra)} extra {extra[:3]}, {len(wrong)} wrong {wrong[:3]}")


def _versions(settings: Settings, expected: ExpectedSamples) -> str:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        stored = dict(conn.execute(f"SELECT stream_id, version FROM {SAMPLES_SCHEMA}.evp_stream_versions"
                                   " WHERE stream_id = ANY(%s)", (list(expected.versions),)).fetchall())
    wrong = sorted(s for s, v in expected.versions.items() if stored.get(s) != v)
    return f"{len(wrong)} valid streams not at their last version, e.g. {wrong[:3]}" if wrong else ""
