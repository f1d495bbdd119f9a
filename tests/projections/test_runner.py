"""The runner against real Kafka and PostgreSQL: exactly-once effects, restarts, dead letters,
erasures, rebuilds."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from events.adapters.kafka import producer
from events.event import HEADER_EVENT_ID, HEADER_OCCURRED_AT, HEADER_STREAM_VERSION
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import LogRecord
from projections.deadletter import STAGE_APPLY, STAGE_DECODE, read_dead_letters
from projections.rebuild import rebuild
from projections.runner import Progress, ProjectionRunner, projection_lag, select_new
from projections.tables import digest, read_rows
from projections.view import ERASED
from tests.support.views import (
    ANNOTATORS_SCHEMA, SAMPLES_SCHEMA, AnnotatorsView, ExpectedSamples, SamplesView, assert_samples, corrected, forgotten,
    random_ops, registered, republish_everything, retracted, sample_rows, submitted,
)

# -- deduplication, pure -------------------------------------------------------------------


def _rec(stream: str, version: int) -> LogRecord:
    return LogRecord(0, 0, stream, version, uuid.uuid4(), "digits.SampleRetracted", 1, "", "", {})


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
def _history(store: EventStore, seed: int = 1, count: int = 60) -> ExpectedSamples:
    expected = ExpectedSamples()
    random_ops(random.Random(seed), store, expected, "x", count)
    store.flush()
    return expected


@pytest.mark.services
def test_relay_duplicates_have_no_effect_across_and_within_batches(store: EventStore, settings: Settings) -> None:
    expected = _history(store)
    total = sum(expected.versions.values())
    with ProjectionRunner(settings, SamplesView()) as runner:
        assert runner.catch_up().applied == total
        assert republish_everything(settings) == total
        assert store.flush() == total
        again = runner.catch_up()
    assert (again.applied, again.skipped) == (0, total)
    with ProjectionRunner(settings, SamplesView(), schema="from_scratch") as fresh:  # both copies, often in one batch
        both = fresh.catch_up()
    assert (both.applied, both.skipped) == (total, total)
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
        assert_samples(conn, expected.rows, schema="from_scratch")
        versions: dict[str, int] = dict(conn.execute(f"SELECT stream_id, version FROM {SAMPLES_SCHEMA}.evp_stream_versions").fetchall())
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
    lags = projection_lag(settings, SAMPLES_SCHEMA)
    assert lags and all(l.lag == 0 and l.next_offset == l.end_offset for l in lags)
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)


@pytest.mark.services
def test_a_lag_is_never_negative_when_the_runner_commits_between_its_two_reads(
        store: EventStore, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lag reads the view's offsets and the topic's ends: a batch committed between the two
    reads (more events, folded at once) must not show the view ahead of the topic."""
    import projections.runner as runner_module

    expected = _history(store, seed=4, count=20)
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
        real = runner_module.end_offsets

        def ends_then_a_commit(s: Settings, topic: str) -> dict[int, int]:
            ends = real(s, topic)
            random_ops(random.Random(5), store, expected, "late", 20)
            store.flush()
            assert runner.catch_up().applied > 0
            return ends

        monkeypatch.setattr(runner_module, "end_offsets", ends_then_a_commit)
        lags = projection_lag(settings, SAMPLES_SCHEMA)
    assert lags and all(l.lag >= 0 for l in lags), lags


@pytest.mark.services
def test_the_view_equals_the_independent_fold_for_random_histories(store: EventStore, settings: Settings) -> None:
    expected = ExpectedSamples()
    with ProjectionRunner(settings, SamplesView(), batch_size=7) as runner:  # small batches: many boundaries

        @hsettings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.integers(0, 2**32), st.integers(1, 25))
        def check(seed: int, count: int) -> None:
            prefix = f"h{uuid.uuid4().hex[:8]}-"
            random_ops(random.Random(seed), store, expected, prefix, count)
            store.flush()
            runner.catch_up()
            with psycopg.connect(settings.database_url) as conn:
                assert_samples(conn, expected.restricted(prefix), prefix=prefix)

        check()


@pytest.mark.services
@pytest.mark.parametrize("prefetch", [False, True], ids=["inline", "prefetch-process"])
def test_undecodable_and_poison_records_are_dead_lettered_and_the_rest_applied(store: EventStore, settings: Settings,
                                                                               prefetch: bool) -> None:
    expected = ExpectedSamples()
    expected.append(store, "sample-ok1", submitted("ok1", "a1", 1, 1))
    store.flush()

    def framed(sample_id: str, source: str, annotator: str = "a1") -> bytes:
        datum = {"sample_id": sample_id, "annotator_id": annotator, "features": [1.0], "label": 1, "source": source}
        return store.codec.encode("SampleSubmitted", datum).value

    def headers(version: int = 1) -> list[tuple[str, bytes]]:
        return [(HEADER_EVENT_ID, str(uuid.uuid4()).encode()), (HEADER_STREAM_VERSION, str(version).encode()),
                (HEADER_OCCURRED_AT, b"2026-01-01T00:00:00+00:00")]

    bad = {  # key -> (value, headers, stage, words the reason must contain)
        b"garbage": (b"hello, not avro", headers(), STAGE_DECODE, "magic byte"),
        b"unknown-schema": (b"\x00\x00\x0f\x42\x3f" + b"\x02", headers(), STAGE_DECODE, "999999 is not in the registry"),
        b"no-headers": (framed("nh", ""), [], STAGE_DECODE, "headers"),
        b"sample-empty-id": (framed("", ""), headers(), STAGE_APPLY, "sample_id"),
        b"sample-no-annotator": (framed("na", "", annotator=""), headers(), STAGE_APPLY, "annotator_id"),
        b"sample-nul": (framed("nul", "a\x00b"), headers(), STAGE_APPLY, "DataError"),
    }
    kafka = producer(settings)
    sent = {key: kafka.send(settings.events_topic, key=key, value=value, headers=h).get(timeout=30)
            for key, (value, h, _, _) in bad.items()}
    kafka.send(settings.events_topic, key=None, value=framed("nokey", ""), headers=headers()).get(timeout=30)
    kafka.close()
    expected.append(store, "sample-ok2", submitted("ok2", "a1", 2, 2))
    store.flush()

    with ProjectionRunner(settings, SamplesView(), prefetch=prefetch) as runner:
        result = runner.catch_up()
    assert (result.applied, result.dead_lettered) == (2, len(bad) + 1)
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)

    letters = {letter.key: letter for letter in read_dead_letters(settings, settings.dead_letter_topic)}
    assert len(letters) == len(bad) + 1 and None in letters
    for key, (value, _, stage, words) in bad.items():
        letter = letters[key]
        assert (letter.stage, letter.value, letter.projection) == (stage, value, "samples")
        assert words in letter.reason, letter.reason
        assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
            settings.events_topic, sent[key].partition, sent[key].offset)
    assert "no key" in letters[None].reason


@pytest.mark.services
def test_erasures_redact_rows_whether_they_arrive_before_or_after_them(store: EventStore, settings: Settings) -> None:
    for annotator in ("a1", "a2"):
        store.append(f"annotator-{annotator}", registered(annotator))
    store.append("erasure-a1", forgotten("a1"))
    store.append("erasure-b1", forgotten("b1"))  # before b1 registers: the view must remember it
    store.flush()
    with ProjectionRunner(settings, AnnotatorsView()) as runner:
        runner.catch_up()
        store.append("annotator-b1", registered("b1"))
        store.flush()
        runner.catch_up()
    with psycopg.connect(settings.database_url) as conn, conn.cursor() as cur:
        rows = read_rows(cur, AnnotatorsView())
    state = {k: (r[ERASED], r["name"] is None, r["email"] is None) for k, r in rows.items()}
    assert state == {"a1": (True, True, True), "b1": (True, True, True), "a2": (False, False, False)}
    assert AnnotatorsView().open(rows["a2"], "email", store.keyring) == "a2@example.org"


def _annotators(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT * FROM {ANNOTATORS_SCHEMA}.annotators ORDER BY annotator_id").fetchall()


@pytest.mark.services
def test_rebuild_gives_the_incremental_view_and_readers_never_see_it_half_built(store: EventStore, settings: Settings) -> None:
    expected = _history(store, seed=4, count=80)
    republish_everything(settings)
    store.flush()
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
    table = f"{SAMPLES_SCHEMA}.samples"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        incremental = sample_rows(conn)
        conn.execute(f"DELETE FROM {table} WHERE sample_id IN (SELECT sample_id FROM {table} LIMIT 5)")
    full, damaged = len(incremental), len(incremental) - 5

    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        with psycopg.connect(settings.database_url, autocommit=True) as reader:
            while not stop.is_set() or len(seen) < 3:
                try:
                    seen.append(reader.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]
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
    total = sum(expected.versions.values())
    assert (result.replay.applied, result.replay.skipped) == (total, total)
    assert result.rows == {"samples": full}
    with psycopg.connect(settings.database_url) as conn:
        assert sample_rows(conn) == incremental
        assert_samples(conn, expected.rows)
        leftovers = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'samples_view%'").fetchall()
    assert leftovers == [(SAMPLES_SCHEMA,)]


@pytest.mark.services
def test_rebuild_keeps_erasures_and_sealed_columns(store: EventStore, settings: Settings) -> None:
    store.append("erasure-b1", forgotten("b1"))
    for annotator in ("a1", "b1"):
        store.append(f"annotator-{annotator}", registered(annotator))
    store.flush()
    with ProjectionRunner(settings, AnnotatorsView()) as runner:
        runner.catch_up()
    with psycopg.connect(settings.database_url) as conn:
        before = _annotators(conn)
    assert rebuild(settings, AnnotatorsView()).rows == {"annotators": 2}
    with psycopg.connect(settings.database_url) as conn:
        assert _annotators(conn) == before


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
        assert_samples(conn, expected.rows)


@pytest.mark.services
def test_a_correction_and_a_retraction_in_one_append_fold_in_order(store: EventStore, settings: Settings) -> None:
    expected = ExpectedSamples()
    expected.append(store, "sample-t", [submitted("t", "a1", 1, 2, 9), corrected("t", "a1", 2), corrected("t", "a1", 3)])
    expected.append(store, "sample-u", [submitted("u", "a1", 1, 3, 9), retracted("u", "a1"), corrected("u", "a1", 5)])
    store.flush()
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
    assert expected.rows["t"]["corrections"] == 2 and "u" not in expected.rows


@pytest.mark.services
def test_the_view_digest_is_equal_for_equal_rows_however_they_were_folded(store: EventStore, settings: Settings) -> None:
    """One catch-up in big batches, one in batches of 3 and a rebuild: one digest; a changed row: another."""
    _history(store, seed=21, count=80)
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
    with ProjectionRunner(settings, SamplesView(), schema="digest_small_batches", batch_size=3) as runner:
        runner.catch_up()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        live = digest(conn, SamplesView())
        small = digest(conn, SamplesView(), "digest_small_batches")
        assert (live.rows, live.sha256) == (small.rows, small.sha256) and live.rows > 0
        rebuild(settings, SamplesView())
        assert digest(conn, SamplesView()).sha256 == live.sha256
        conn.execute(f"UPDATE {SAMPLES_SCHEMA}.samples SET label = label + 1 WHERE sample_id = "
                     f"(SELECT min(sample_id) FROM {SAMPLES_SCHEMA}.samples)")
        assert digest(conn, SamplesView()).sha256 != live.sha256


@pytest.mark.services
def test_the_digest_command_prints_rows_and_hash(store: EventStore, settings: Settings, tmp_path: Any) -> None:
    _history(store, seed=22, count=20)
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "events.cli", "projections", "digest", "samples", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        expected = digest(conn, SamplesView())
    assert printed == {"view": "samples", "schema": expected.schema, "rows": expected.rows, "sha256": expected.sha256}
