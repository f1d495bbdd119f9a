"""Where batches come from: the inline source and the prefetch process, against real Kafka.

Both sources must deliver the same messages and the same decoded records from any position;
the prefetch process must never deliver a batch fetched before a re-seek, must be survivable
(SIGKILL it and the runner re-opens it and loses nothing) and must not outlive its consumer.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import psycopg
import pytest

from events.adapters.kafka import consumer
from events.errors import ServiceUnavailable
from events.settings import Settings
from events.store.client import EventStore
from events.store.log import BadRecord, LogRecord, end_offsets
from projections.runner import ProjectionRunner, projection_lag
from events.store.source import Batch, InlineSource, PrefetchSource, open_codec
from tests.support.views import REPO, ExpectedSamples, SamplesView, assert_samples, random_ops

pytestmark = pytest.mark.services


def _history(store: EventStore, seed: int, count: int) -> ExpectedSamples:
    expected = ExpectedSamples()
    random_ops(random.Random(seed), store, expected, "src", count)
    store.flush()
    return expected


def _drain(source: InlineSource | PrefetchSource, ends: Mapping[int, int]) -> tuple[list[tuple[Any, ...]], list[Any], dict[int, int]]:
    """Everything up to ``ends``: (messages as tuples, records, last positions)."""
    messages: list[tuple[Any, ...]] = []
    records: list[Any] = []
    positions: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while any(positions.get(p, -1) < end for p, end in ends.items() if end > 0) and time.monotonic() < deadline:
        batch = source.poll(500)
        messages += [(m.partition, m.offset, m.key, m.value, tuple(m.headers or ())) for m in batch.messages]
        records += batch.records
        positions.update(batch.positions)
    return messages, records, positions


def test_both_sources_deliver_the_same_messages_and_records_from_any_position(store: EventStore, settings: Settings) -> None:
    _history(store, seed=11, count=80)
    ends = end_offsets(settings, settings.events_topic)
    rng = random.Random(5)
    starts: dict[int, int | None] = {p: rng.choice([None, rng.randrange(0, end + 1)]) if end else None
                                     for p, end in ends.items()}
    kafka = consumer(settings, max_poll_records=9)
    inline = InlineSource(settings, kafka, open_codec(settings), batch_size=9)
    prefetch = PrefetchSource(settings, None, batch_size=9)
    try:
        assert inline.assign(starts) == prefetch.assign(starts) == {p: s or 0 for p, s in starts.items()}
        got_inline, got_prefetch = _drain(inline, ends), _drain(prefetch, ends)
    finally:
        prefetch.close()
        kafka.close()
    assert got_inline[0] == got_prefetch[0], "the same raw messages, in the same order"
    assert got_inline[1] == got_prefetch[1], "the same decoded records"
    assert got_inline[2] == got_prefetch[2] == ends
    assert len(got_inline[0]) == sum(end - (starts[p] or 0) for p, end in ends.items()) > 0
    assert all(isinstance(r, LogRecord) for r in got_prefetch[1])
    assert all(r.policy is not None for r in got_prefetch[1]), "records carry their writer's policy"


def test_a_re_seek_drops_what_the_prefetch_process_had_fetched_ahead(store: EventStore, settings: Settings) -> None:
    _history(store, seed=12, count=60)
    ends = end_offsets(settings, settings.events_topic)
    partition = max(ends, key=lambda p: ends[p])
    assert ends[partition] >= 6
    source = PrefetchSource(settings, None, batch_size=2)
    try:
        source.assign({partition: 0})
        first = source.poll(5000)
        assert [m.offset for m in first.messages] == [0, 1]
        time.sleep(0.5)  # the process has fetched the next batches by now and waits to hand them over
        back = ends[partition] - 3
        assert source.assign({partition: back}) == {partition: back}
        after = source.poll(5000)
        assert [m.offset for m in after.messages] == [back, back + 1], "nothing fetched before the seek"
        assert after.positions == {partition: back + 2}
    finally:
        source.close()


def test_undecodable_records_arrive_as_bad_records_with_their_bytes(store: EventStore, settings: Settings) -> None:
    from events.adapters.kafka import producer

    kafka = producer(settings)
    sent = kafka.send(settings.events_topic, key=b"junk", value=b"\x00\x00\x00\x00\x07not avro", headers=[]).get(timeout=30)
    kafka.close()
    source = PrefetchSource(settings, None, batch_size=10)
    try:
        source.assign({sent.partition: sent.offset})
        batch = Batch()
        deadline = time.monotonic() + 30
        while not batch.messages and time.monotonic() < deadline:
            batch = source.poll(1000)
    finally:
        source.close()
    [bad] = batch.records
    assert isinstance(bad, BadRecord) and (bad.key, bad.value, bad.offset) == (b"junk", b"\x00\x00\x00\x00\x07not avro", sent.offset)
    assert "schema id 7" in bad.reason


def test_a_prefetching_runner_survives_its_prefetch_process_being_killed(store: EventStore, settings: Settings) -> None:
    """SIGKILL the prefetch process mid-catch-up, twice: the runner re-opens it; the view equals the fold."""
    expected = _history(store, seed=13, count=150)
    stop = threading.Event()
    runner = ProjectionRunner(settings, SamplesView(), batch_size=7, prefetch=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(stop)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            failure.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(killed) < 2 and time.monotonic() < deadline:
            source = runner._source
            process = getattr(source, "_process", None)
            if process is not None and process.pid not in killed and process.poll() is None:
                time.sleep(0.05 * (1 + len(killed)))
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.pid)
            time.sleep(0.02)
        assert len(killed) == 2, "the runner started a new prefetch process after the first was killed"
        while sum(lag.lag for lag in projection_lag(settings, SamplesView().default_schema)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=60)
        runner.close()
    assert not failure, failure
    with psycopg.connect(settings.database_url) as conn:
        assert_samples(conn, expected.rows)
        versions = dict(conn.execute(f"SELECT stream_id, version FROM {SamplesView().default_schema}.evp_stream_versions"))
    assert versions == expected.versions, "every event applied once"


def test_a_dead_prefetch_process_is_reported_as_retryable(store: EventStore, settings: Settings) -> None:
    _history(store, seed=14, count=10)
    source = PrefetchSource(settings, None, batch_size=5)
    try:
        source.assign({0: 0})
        os.kill(source._process.pid, signal.SIGKILL)
        source._process.wait(timeout=10)
        with pytest.raises(ServiceUnavailable, match="prefetch"):
            for _ in range(20):
                source.poll(200)
    finally:
        source.close()


_ORPHAN = """
import sys, time
from events.settings import Settings
from events.store.source import PrefetchSource
source = PrefetchSource(Settings.from_env(), None, batch_size=5)
source.assign({0: 0})
print(source._process.pid, flush=True)
time.sleep(600)
"""


def test_the_prefetch_process_exits_when_its_consumer_is_killed(settings: Settings) -> None:
    env = dict(os.environ, **settings.to_env())
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the prefetch process outlived its consumer"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
