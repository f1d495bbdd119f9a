"""Poison the runner used to stop on, skip or apply silently, and ``evp projections dlq list|replay``.

Each case wrote records straight to the events topic, as a broken or hostile producer would:
a record just under the topic's size limit whose letter is over it stopped the runner (the
dead-letter send failed), a stream version 0 or below was skipped for ever, a schema of
another topic was applied, and a copy of a record's key and version with other content was
dropped as a re-send. Now each is one dead letter, and ``dlq replay`` re-drives letters.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from events.adapters.kafka import ensure_event_topics, producer
from events.errors import InvalidEvent
from events.event import HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_OCCURRED_AT, HEADER_STREAM_VERSION, kafka_headers
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import LogRecord
from events.store.source import Batch, Message
from projections.deadletter import STAGE_APPLY, STAGE_CONFLICT, STAGE_DECODE, DeadLetter, read_dead_letters
from projections.declarations import load_view
from projections.runner import ProjectionRunner
from projections.view import FORGOTTEN
from tests.support.cli import evp
from tests.support.examples import DIGITS, project
from tests.support.poison import limit_messages
from tests.support.views import AnnotatorsView, ExpectedSamples, SamplesView, assert_samples, republish_everything, submitted


def _headers(version: int = 1, event_id: uuid.UUID | None = None) -> list[tuple[str, bytes]]:
    return [(HEADER_EVENT_ID, str(event_id or uuid.uuid4()).encode()), (HEADER_STREAM_VERSION, str(version).encode()),
            (HEADER_OCCURRED_AT, b"2026-01-01T00:00:00+00:00")]


def _framed(store: EventStore, sample_id: str, label: int = 1, source: str = "") -> bytes:
    datum = {"sample_id": sample_id, "annotator_id": "a1", "features": [1.0], "label": label, "source": source}
    return store.codec.encode("SampleSubmitted", datum).value


def _send(settings: Settings, records: Sequence[tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]],
          **config: Any) -> list[tuple[int, int]]:
    """Write records straight to the events topic; their (partition, offset)."""
    kafka = producer(settings, **config)
    try:
        sent = [kafka.send(settings.events_topic, key=k, value=v, headers=list(h)) for k, v, h in records]
        return [(md.partition, md.offset) for md in (f.get(timeout=30) for f in sent)]
    finally:
        kafka.close()


def _letters(settings: Settings) -> dict[tuple[int, int], list[DeadLetter]]:
    grouped: dict[tuple[int, int], list[DeadLetter]] = {}
    for letter in read_dead_letters(settings, settings.dead_letter_topic, projection="samples"):
        grouped.setdefault((letter.source_partition, letter.source_offset), []).append(letter)
    return grouped


def _started(store: EventStore, *samples: str) -> ExpectedSamples:
    """The fold of one submitted sample per name, appended and published."""
    expected = ExpectedSamples()
    for n, sample in enumerate(samples):
        expected.append(store, f"sample-{sample}", submitted(sample, "a1", n + 1, n + 1))
    store.flush()
    return expected


def _catch_up(settings: Settings, **options: Any) -> Any:
    with ProjectionRunner(settings, load_view(project(DIGITS), "samples"), **options) as runner:
        return runner.catch_up()


@pytest.mark.services
def test_a_record_too_large_for_a_letter_is_dead_lettered_without_its_content_and_the_runner_goes_on(
        store: EventStore, settings: Settings) -> None:
    expected = _started(store, "ok1")
    ensure_event_topics(settings)
    limit_messages(settings, settings.dead_letter_topic, 20_000)  # under the producer's limit: the broker refuses
    big, middling = b"\x07" * 1_048_300, b"\x07" * 50_000  # the first fits the events topic, not with letter headers
    places = _send(settings, [(b"big", big, _headers()), (b"middling", middling, _headers())], max_request_size=2**21)
    expected.append(store, "sample-ok2", submitted("ok2", "a1", 2, 2))
    store.flush()

    result = _catch_up(settings)  # raised MessageSizeTooLargeError before: the runner stopped on it, for ever
    assert (result.applied, result.dead_lettered) == (2, 2)
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
    letters = _letters(settings)
    for place, original in zip(places, (big, middling)):
        (letter,) = letters[place]
        assert (letter.stage, letter.value, letter.omitted) == (STAGE_DECODE, b"", ("value",))
        assert letter.original_bytes is not None and letter.original_bytes > len(original)
        assert "magic byte" in letter.reason and letter.key in (b"big", b"middling")

    replayed = evp(settings, "projections", "dlq", "replay", "samples", "--all", "--json")
    assert replayed.code == 1, replayed  # read back from the events topic, digest checked, and still undecodable
    assert json.loads(replayed.out)["failed"] == 2
    again = _letters(settings)
    assert all(len(again[p]) == 2 and again[p][-1].attempts == 1 and again[p][-1].omitted == ("value",) for p in places)


@pytest.mark.services
def test_malformed_records_are_dead_lettered_instead_of_skipped_or_applied(store: EventStore, settings: Settings) -> None:
    expected = _started(store, "ok")
    foreign = store.codec.registry.register(f"{settings.topic_prefix}.other-digits.SampleSubmitted",
                                            store.codec.catalog.wire_schema("digits.SampleSubmitted"))
    valid = _framed(store, "foreign")
    elsewhere = valid[:1] + foreign.to_bytes(4, "big") + valid[5:]  # a valid SampleSubmitted, of another topic
    bad = {
        "version 0": (b"sample-v0", _framed(store, "v0"), _headers(0), "start at 1"),
        "negative version": (b"sample-neg", _framed(store, "neg"), _headers(-3), "start at 1"),
        "empty key": (b"", _framed(store, "empty"), _headers(), "key (stream id) is empty"),
        "another topic's schema": (b"sample-foreign", elsewhere, _headers(), "is registered under subject"),
    }
    places = _send(settings, [(k, v, h) for k, v, h, _ in bad.values()])
    result = _catch_up(settings)
    assert (result.applied, result.dead_lettered) == (1, len(bad))
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)  # the foreign SampleSubmitted was applied before
    letters = _letters(settings)
    for place, (what, (_, _, _, words)) in zip(places, bad.items()):
        (letter,) = letters[place]
        assert letter.stage == STAGE_DECODE and words in letter.reason, (what, letter.reason)


@pytest.mark.services
def test_a_copy_of_a_records_key_and_version_with_other_content_is_dead_lettered_and_a_re_send_is_skipped(
        store: EventStore, settings: Settings) -> None:
    expected = _started(store, "a")
    assert _catch_up(settings).applied == 1
    (recorded,) = store.ledger.read_stream("sample-a")
    headers = kafka_headers(recorded)
    assert republish_everything(settings) == 1 and store.flush() == 1  # a relay's re-send: the same record
    expected.append(store, "sample-b", submitted("b", "a1", 2, 2))
    store.flush()
    (b_recorded,) = store.ledger.read_stream("sample-b")
    forged = _send(settings, [
        (b"sample-a", _framed(store, "a", label=9), headers),  # an earlier batch took (sample-a, 1)
        (b"sample-a", recorded.value, [(k, v) for k, v in headers if k != HEADER_EVENT_ID] + _headers()[:1]),  # other id
        (b"sample-b", _framed(store, "b", label=9), kafka_headers(b_recorded)),  # this batch takes (sample-b, 1)
    ])
    result = _catch_up(settings)
    assert (result.applied, result.skipped, result.dead_lettered) == (1, 1, 3)
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
    letters = _letters(settings)
    assert set(letters) == set(forged)
    assert all(l.stage == STAGE_CONFLICT and "conflicting duplicate" in l.reason for (l,) in letters.values())


def test_an_erasure_holds_a_scaled_out_batch_alone_whatever_its_type_header_says() -> None:
    runner = ProjectionRunner(Settings.from_env({}), AnnotatorsView())
    erasure = LogRecord(0, 5, "erasure-x", 1, uuid.uuid4(), FORGOTTEN, 1, "", "", {"subject_id": "x"})
    unlabelled = Message("t", 0, 5, b"erasure-x", b"", ((HEADER_EVENT_TYPE, b"digits.SampleSubmitted"),))
    assert runner.exclusive(Batch([unlabelled], [erasure], {}))
    other = LogRecord(0, 5, "s", 1, uuid.uuid4(), "digits.SampleSubmitted", 1, "", "", {})
    assert not runner.exclusive(Batch([unlabelled], [other], {}))


@pytest.mark.services
def test_one_poison_record_in_a_large_batch_costs_a_few_applies_not_one_per_record(
        store: EventStore, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = ExpectedSamples()
    for n in range(8):
        expected.append(store, f"sample-p{n}", [submitted(f"p{n}-{i}", "a1", i % 10, i) for i in range(32)])
    store.flush()
    _send(settings, [(b"sample-nul", _framed(store, "nul", source="a\x00b"), _headers())])
    calls: list[int] = []
    apply = ProjectionRunner.apply

    def counted(self: ProjectionRunner, cur: Any, records: Sequence[LogRecord]) -> Any:
        calls.append(len(records))
        return apply(self, cur, records)

    monkeypatch.setattr(ProjectionRunner, "apply", counted)
    result = _catch_up(settings, batch_size=1000)
    assert (result.applied, result.dead_lettered) == (256, 1)
    assert len(calls) <= 2 * math.ceil(math.log2(257)) + 1, calls  # one by one was 258 applies
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)


@pytest.mark.services
def test_a_record_a_bug_refused_applies_exactly_once_when_replayed_after_the_fix(
        store: EventStore, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = ExpectedSamples()
    expected.append(store, "sample-ok", submitted("ok", "a1", 1, 1))
    expected.append(store, "sample-seven", submitted("seven", "a1", 7, 2))
    store.flush()
    key_field, handler = SamplesView._handlers["SampleSubmitted"]

    def buggy(view: SamplesView, row: Any, record: LogRecord) -> Any:
        if record.data["label"] == 7:
            raise InvalidEvent(record.event_type, "label", "7 is not a digit (a bug)")
        return handler(view, row, record)

    with monkeypatch.context() as bug:
        bug.setitem(SamplesView._handlers, "SampleSubmitted", (key_field, buggy))
        assert (_catch_up(settings).dead_lettered, _catch_up(settings).dead_lettered) == (1, 0)
    (recorded,) = store.ledger.read_stream("sample-seven")

    listed = evp(settings, "projections", "dlq", "list", "samples", "--json")
    (dead,) = json.loads(listed.out)["records"]
    assert (dead["stage"], dead["state"], dead["event_id"], dead["letters"]) == (STAGE_APPLY, "dead", str(recorded.event_id), 1)
    assert "7 is not a digit" in dead["reason"] and dead["dead_at"]
    assert (dead["source_partition"], dead["source_offset"]) == (recorded.partition, recorded.offset)

    replayed = evp(settings, "projections", "dlq", "replay", "samples", "--offset", str(dead["letter_offset"]))
    assert replayed.code == 0 and "1 applied" in replayed.out, replayed
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
    again = evp(settings, "projections", "dlq", "replay", "samples", "--all", "--json")
    assert again.code == 0 and (json.loads(again.out)["duplicate"], json.loads(again.out)["applied"]) == (1, 0)
    assert republish_everything(settings) == 2 and store.flush() == 2
    assert _catch_up(settings).skipped == 2  # the relay's re-send of it is a duplicate too: applied once
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
    (after,) = json.loads(evp(settings, "projections", "dlq", "list", "samples", "--json").out)["records"]
    assert after["state"] == "applied"
    assert len(_letters(settings)[(recorded.partition, recorded.offset)]) == 1, "nothing was dead-lettered again"
    missing = evp(settings, "projections", "dlq", "replay", "samples", "--offset", "999")
    assert missing.code == 1 and "no dead record" in missing.err


@pytest.mark.services
def test_a_record_that_still_fails_goes_back_once_per_replay_with_its_attempts_and_nothing_loops(
        store: EventStore, settings: Settings) -> None:
    _started(store, "ok")
    (place,) = _send(settings, [(b"garbage", b"not avro at all", _headers())])
    assert _catch_up(settings).dead_lettered == 1
    for attempt in (1, 2):
        replayed = evp(settings, "projections", "dlq", "replay", "samples", "--all")
        assert replayed.code == 1 and "1 failed again" in replayed.out, replayed
        letters = _letters(settings)[place]
        assert [l.attempts for l in letters] == list(range(attempt + 1))
        assert letters[-1].value == b"not avro at all" and "magic byte" in letters[-1].reason
    listed = evp(settings, "projections", "dlq", "list", "samples")
    assert listed.code == 0 and "1 still dead" in listed.out and "magic byte" in listed.out, listed
    assert _catch_up(settings).dead_lettered == 0, "the runner never reads its letters back"
