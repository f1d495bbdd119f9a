"""The projection runner against real Kafka and PostgreSQL: exactly-once effects, restarts,
dead letters, rebuilds, and the command line."""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import given, strategies as st

from events.store.client import EventStore
from events.event import HEADER_EVENT_ID, HEADER_OCCURRED_AT, HEADER_STREAM_VERSION, Event
from events.adapters.kafka import producer
from events.store.log import LogRecord
from events.settings import Settings
from projections import cli
from projections.deadletter import STAGE_APPLY, STAGE_DECODE, read_dead_letters
from projections.rebuild import rebuild
from projections.runner import Progress, ProjectionRunner, projection_lag, select_new
from projections.samples import SamplesView
from tests.projections import ExpectedView, assert_view, random_ops, submitted, view_rows

# -- deduplication, pure -------------------------------------------------------------------


def _rec(stream: str, version: int) -> LogRecord:
    return LogRecord(0, 0, stream, version, uuid.uuid4(), "evp.samples.SampleRetracted", 1, "", "", {})


@st.composite
def relayed_logs(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Per-stream versions 1..n in order, where a relay may re-send any suffix it had sent."""
    streams = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    per_stream: list[list[int]] = []
    for n in streams:
        sent: list[int] = []
        for v in range(1, n + 1):
            sent.append(v)
            if draw(st.booleans()) and draw(st.booleans()):
                sent.extend(range(draw(st.integers(1, v)), v + 1))  # crash: re-publish from some version on
        per_stream.append(sent)
    # interleave the streams, keeping each stream's own order
    cursors = [0] * len(per_stream)
    log: list[tuple[str, int]] = []
    while any(c < len(s) for c, s in zip(cursors, per_stream)):
        i = draw(st.sampled_from([i for i, s in enumerate(per_stream) if cursors[i] < len(s)]))
        log.append((f"s{i}", per_stream[i][cursors[i]]))
        cursors[i] += 1
    return log


@given(relayed_logs(), st.data())
def test_each_stream_version_is_selected_once_wherever_batches_split(log: list[tuple[str, int]], data: st.DataObject) -> None:
    records = [_rec(s, v) for s, v in log]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(records)), max_size=4)))
    applied: dict[str, int] = {}
    selected: list[tuple[str, int]] = []
    for start, end in zip([0, *cuts], [*cuts, len(records)]):
        new, reached = select_new(records[start:end], applied)
        selected += [(r.stream_id, r.version) for r in new]
        applied |= reached
    assert sorted(selected) == sorted(set(log)), "every (stream, version) exactly once"
    for stream in {s for s, _ in log}:
        versions = [v for s, v in selected if s == stream]
        assert versions == sorted(versions)


# -- against the real services -------------------------------------------------------------
def _republish_everything(settings: Settings) -> int:
    """What a relay does after crashing between sending and recording: send it all again."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        cur = conn.execute("INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events"
                           " ON CONFLICT DO NOTHING")
        return cur.rowcount


def _history(store: EventStore, seed: int = 1, count: int = 60) -> ExpectedView:
    expected = ExpectedView()
    random_ops(random.Random(seed), store, expected, "x", count)
    store.flush()
    return expected


@pytest.mark.services
def test_relay_duplicates_have_no_effect_across_and_within_batches(store: EventStore, settings: Settings) -> None:
    expected = _history(store)
    total = sum(expected.versions.values())
    with ProjectionRunner(settings, SamplesView()) as runner:
        assert runner.catch_up().applied == total
        assert _republish_everything(settings) == total
        assert store.flush() == total
        again = runner.catch_up()
    assert (again.applied, again.skipped) == (0, total)
    with ProjectionRunner(settings, SamplesView(), schema="from_scratch") as fresh:  # both copies, often in one batch
        both = fresh.catch_up()
    assert (both.applied, both.skipped) == (total, total)
    with psycopg.connect(settings.database_url) as conn:
        assert_view(conn, expected.rows)
        assert_view(conn, expected.rows, schema="from_scratch")
        versions = dict(conn.execute("SELECT stream_id, version FROM evp_views.evp_stream_versions").fetchall())
    assert versions == expected.versions


@pytest.mark.services
def test_a_restart_continues_exactly_where_the_view_stopped(store: EventStore, settings: Settings) -> None:
    expected = _history(store, seed=2, count=40)
    first_total = sum(expected.versions.values())
    progress: list[Progress] = []
    with ProjectionRunner(settings, SamplesView(), batch_size=10) as runner:
        assert runner.catch_up(progress.append).applied == first_total
    assert progress and progress[-1].consumed == progress[-1].total == first_total
    assert [p.consumed for p in progress] == sorted(p.consumed for p in progress)

    random_ops(random.Random(3), store, expected, "x", 30)  # touches the same samples: corrections of old rows
    store.flush()
    with ProjectionRunner(settings, SamplesView()) as restarted:
        second = restarted.catch_up()
    assert (second.applied, second.skipped) == (sum(expected.versions.values()) - first_total, 0)
    lags = projection_lag(settings, "evp_views")
    assert lags and all(l.lag == 0 and l.next_offset == l.end_offset for l in lags)
    with psycopg.connect(settings.database_url) as conn:
        assert_view(conn, expected.rows)


@pytest.mark.services
def test_undecodable_and_poison_records_are_dead_lettered_and_the_rest_applied(store: EventStore, settings: Settings) -> None:
    expected = ExpectedView()
    expected.append(store, "sample-ok1", submitted("ok1", "a1", 1, 1))
    store.flush()

    def framed(sample_id: str, source: str) -> bytes:
        datum = {"sample_id": sample_id, "annotator_id": "a1", "features": [1.0], "label": 1, "source": source}
        return store.codec.encode("SampleSubmitted", datum).value

    def headers(version: int = 1) -> list[tuple[str, bytes]]:
        return [(HEADER_EVENT_ID, str(uuid.uuid4()).encode()), (HEADER_STREAM_VERSION, str(version).encode()),
                (HEADER_OCCURRED_AT, b"2026-01-01T00:00:00+00:00")]

    bad = {  # key -> (value, headers, stage, words the reason must contain)
        b"garbage": (b"hello, not avro", headers(), STAGE_DECODE, "magic byte"),
        b"unknown-schema": (b"\x00\x00\x0f\x42\x3f" + b"\x02", headers(), STAGE_DECODE, "999999 is not in the registry"),
        b"no-headers": (framed("nh", ""), [], STAGE_DECODE, "headers"),
        b"sample-empty-id": (framed("", ""), headers(), STAGE_APPLY, "sample_id"),
        b"sample-nul": (framed("nul", "a\x00b"), headers(), STAGE_APPLY, "DataError"),
    }
    kafka = producer(settings.kafka)
    sent = {key: kafka.send(settings.events_topic, key=key, value=value, headers=h).get(timeout=30)
            for key, (value, h, _, _) in bad.items()}
    kafka.send(settings.events_topic, key=None, value=framed("nokey", ""), headers=headers()).get(timeout=30)
    kafka.close()
    expected.append(store, "sample-ok2", submitted("ok2", "a1", 2, 2))
    store.flush()

    with ProjectionRunner(settings, SamplesView()) as runner:
        result = runner.catch_up()
    assert (result.applied, result.dead_lettered) == (2, len(bad) + 1)
    with psycopg.connect(settings.database_url) as conn:
        assert_view(conn, expected.rows)

    letters = {letter.key: letter for letter in read_dead_letters(settings.kafka, settings.dead_letter_topic)}
    assert len(letters) == len(bad) + 1 and None in letters
    for key, (value, _, stage, words) in bad.items():
        letter = letters[key]
        assert (letter.stage, letter.value, letter.projection) == (stage, value, "samples")
        assert words in letter.reason, letter.reason
        assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
            settings.events_topic, sent[key].partition, sent[key].offset)
    assert "no key" in letters[None].reason


def _annotators(conn: psycopg.Connection[Any], schema: str) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT * FROM {schema}.annotators ORDER BY annotator_id").fetchall()


@pytest.mark.services
def test_rebuild_gives_the_incremental_view_and_readers_never_see_it_half_built(store: EventStore, settings: Settings) -> None:
    expected = _history(store, seed=4, count=80)
    store.append("annotator-a1", Event("AnnotatorRegistered", {"annotator_id": "a1", "name": "A", "email": "a@example.org"}))
    store.flush()
    _republish_everything(settings)
    store.flush()
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        incremental, annotators = view_rows(conn), _annotators(conn, "evp_views")
        conn.execute("DELETE FROM evp_views.samples WHERE sample_id IN (SELECT sample_id FROM evp_views.samples LIMIT 5)")
    full, damaged = len(incremental), len(incremental) - 5

    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        with psycopg.connect(settings.database_url, autocommit=True) as reader:
            while not stop.is_set() or len(seen) < 3:
                try:
                    seen.append(reader.execute("SELECT count(*) FROM evp_views.samples").fetchone()[0])
                except psycopg.Error as err:
                    errors.append(err)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        result = rebuild(settings, SamplesView())
        after = len(seen)
        while len(seen) < after + 3:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    assert not errors, f"a reader failed during the swap: {errors[0]}"
    assert set(seen) <= {damaged, full} and seen[0] == damaged and seen[-1] == full
    assert seen == sorted(seen), "once the new view is visible, the old one never comes back"
    total = sum(expected.versions.values()) + 1
    assert (result.replay.applied, result.replay.skipped) == (total, total)
    assert result.rows == {"annotators": 1, "forgotten_subjects": 0, "samples": full}
    with psycopg.connect(settings.database_url) as conn:
        assert view_rows(conn) == incremental
        assert_view(conn, expected.rows)
        assert _annotators(conn, "evp_views") == annotators
        leftovers = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'evp_views%'").fetchall()
    assert leftovers == [("evp_views",)]


@pytest.mark.services
def test_a_runner_that_read_past_the_rebuild_re_seeks_after_the_swap(store: EventStore, settings: Settings) -> None:
    expected = _history(store, seed=5, count=30)
    with ProjectionRunner(settings, SamplesView()) as live:
        live.catch_up()

        def race_ahead() -> None:  # events the shadow has not seen, applied to the old view only
            random_ops(random.Random(6), store, expected, "x", 20)
            store.flush()
            assert live.catch_up().applied > 0

        rebuild(settings, SamplesView(), before_swap=race_ahead)
        random_ops(random.Random(7), store, expected, "y", 10)
        store.flush()
        live.catch_up()
    with psycopg.connect(settings.database_url) as conn:
        assert_view(conn, expected.rows)


@pytest.mark.services
def test_command_line_catch_up_status_and_rebuild(store: EventStore, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    expected = _history(store, seed=8, count=20)
    parser = argparse.ArgumentParser(prog="evp")
    cli.register(parser.add_subparsers(dest="command", required=True))

    def evp(*argv: str) -> Any:
        args = parser.parse_args(["projections", *argv, "--json"])
        assert args.func(args, settings) == 0
        return json.loads(capsys.readouterr().out)

    before = evp("status")
    assert sum(p["lag"] for p in before["partitions"]) == sum(expected.versions.values())
    assert evp("catch-up")["applied"] == sum(expected.versions.values())
    assert all(p["lag"] == 0 for p in evp("status")["partitions"])
    assert evp("rebuild")["rows"]["samples"] == len(expected.rows)
