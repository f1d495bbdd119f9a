"""The relay: leases, take-over after a crash, status, NOTIFY wake-up, and the oracle itself."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import ContextManager

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka import TopicPartition

from events.adapters import postgres
from events.store.client import EventStore
from events.event import HEADER_EVENT_ID
from events.adapters.kafka import consumer
from events.store.partitioning import partition_for
from events.store.relay import Relay, relay_status
from events.settings import Settings
from tests.faults.helpers import (
    REPO,
    StreamLog,
    assert_topic_matches_ledger,
    dedupe,
    outbox_depth,
    read_ledger,
    read_topic,
    sample_event,
    wait_for,
)

ALL = {0, 1, 2}


# -- the oracle the fault tests rely on: it must accept re-publication and reject loss ----------
@st.composite
def published(draw: st.DrawFn) -> tuple[StreamLog, StreamLog]:
    """A ledger, and a topic as relays that crash between send and commit would leave it."""
    ledger: StreamLog = {}
    topic: StreamLog = {}
    for s in range(draw(st.integers(1, 3))):
        entries = [(v, uuid.uuid4()) for v in range(1, draw(st.integers(1, 8)) + 1)]
        sent: list[tuple[int, uuid.UUID]] = []
        committed = 0
        for _ in range(draw(st.integers(0, 4))):  # crashes: sent up to `upto`, committed somewhere before
            upto = draw(st.integers(committed, len(entries)))
            sent += entries[committed:upto]
            committed = draw(st.integers(committed, upto))
        sent += entries[committed:]
        ledger[f"s{s}"], topic[f"s{s}"] = entries, sent
    return ledger, topic


@given(published())
def test_the_oracle_accepts_any_republication_and_counts_it(case: tuple[StreamLog, StreamLog]) -> None:
    ledger, topic = case
    check = assert_topic_matches_ledger(topic, ledger)
    assert check.events + check.duplicates == sum(len(t) for t in topic.values())


@given(published(), st.sampled_from(["drop", "swap", "forge", "stranger", "gap"]), st.randoms(use_true_random=False))
def test_the_oracle_rejects_loss_reordering_and_forged_duplicates(
    case: tuple[StreamLog, StreamLog], fault: str, rng: random.Random
) -> None:
    ledger, topic = case
    stream = sorted(ledger)[0]
    kept, _ = dedupe(stream, topic[stream])
    entries = list(topic[stream])
    if fault == "drop":  # every copy of one event is lost
        victim = rng.choice(kept)
        entries = [e for e in entries if e != victim]
    elif fault == "swap":
        if len(kept) < 2:
            return
        entries = [kept[1], kept[0], *entries]  # the second version is seen first
    elif fault == "forge":  # a "duplicate" that carries another event id
        entries = [*entries, (kept[-1][0], uuid.uuid4())]
    elif fault == "stranger":
        topic = {**topic, "unknown": [(1, uuid.uuid4())]}
    else:  # a half-written append in the ledger
        ledger = {**ledger, stream: [(v + 1, i) for v, i in ledger[stream]]}
    topic = {**topic, stream: entries} if fault != "stranger" else topic
    with pytest.raises(AssertionError):
        assert_topic_matches_ledger(topic, ledger)


# -- relays against the real services ----------------------------------------------------------
def fill(store: EventStore, count: int, tag: str) -> list[str]:
    """Append one event to each of ``count`` streams, which spread over every partition."""
    streams = [f"sample-{tag}-{i}" for i in range(count)]
    for stream_id in streams:
        store.append(stream_id, sample_event(stream_id))
    assert {partition_for(s, store.settings.partitions) for s in streams} == ALL
    return streams


def running(relay: Relay) -> ContextManager[Relay]:
    return relay.in_background()


def new_relay(settings: Settings, poll_interval: float = 0.5) -> Relay:
    return Relay(settings, poll_interval=poll_interval)


def holders(settings: Settings) -> dict[int, int]:
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        return relay_status(conn, settings.events_topic).lease_holders


def backend_pid(relay: Relay) -> int:
    return relay._connection().info.backend_pid


def assert_published(settings: Settings) -> None:
    wait_for(lambda: outbox_depth(settings.database_url) == 0, 30, "the outbox to drain")
    assert_topic_matches_ledger(read_topic(settings), read_ledger(settings.database_url))


@pytest.mark.services
def test_two_relays_split_the_leases_and_the_survivor_takes_over(store: EventStore, settings: Settings) -> None:
    first, second = new_relay(settings), new_relay(settings)
    taken = first.acquire_leases(), second.acquire_leases()
    assert taken[0].isdisjoint(taken[1]) and taken[0] | taken[1] == ALL
    assert holders(settings) == {p: backend_pid(first if p in taken[0] else second) for p in ALL}
    fill(store, 12, "a")
    published_by = first.publish_pending(), second.publish_pending()
    assert sum(published_by) == 12 and published_by[1] == 0  # the second holds nothing: it must not publish
    first.close()
    wait_for(lambda: second.acquire_leases() == ALL, 10, "the second relay to take every lease")
    assert holders(settings) == {p: backend_pid(second) for p in ALL}
    fill(store, 12, "b")
    assert second.publish_pending() == 12
    second.close()
    assert_published(settings)


@pytest.mark.services
def test_relay_status_shows_depth_age_and_lease_holders(store: EventStore, settings: Settings) -> None:
    streams = fill(store, 9, "s")
    with postgres.connect(settings.database_url, autocommit=True) as conn:
        before = relay_status(conn, settings.events_topic)
        relay = new_relay(settings)
        relay.acquire_leases()
        held = relay_status(conn, settings.events_topic)
        relay.publish_pending()
        after = relay_status(conn, settings.events_topic)
        relay.close()
    expected_depth = Counter(partition_for(s, settings.partitions) for s in streams)
    assert (before.outbox_depth, before.depth_by_partition, before.lease_holders) == (9, dict(expected_depth), {})
    assert before.oldest_age_seconds is not None and 0 <= before.oldest_age_seconds < 120
    assert set(held.lease_holders) == ALL and len(set(held.lease_holders.values())) == 1
    assert (after.outbox_depth, after.depth_by_partition, after.oldest_age_seconds) == (0, {}, None)


@pytest.mark.services
def test_a_sigkilled_relay_process_loses_its_leases_to_a_waiting_relay(store: EventStore, settings: Settings) -> None:
    env = {**os.environ, **settings.to_env()}
    process = subprocess.Popen(
        [sys.executable, "-m", "events.cli", "relay", "run"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: set(holders(settings)) == ALL or process.poll() is not None, 90, "the relay process to take every lease")
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        standby = new_relay(settings, poll_interval=0.2)
        with running(standby):
            fill(store, 9, "before")
            assert_published(settings)
            assert standby.published == 0, "the standby holds no lease and must not publish"
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            fill(store, 9, "after")
            assert_published(settings)
            assert standby.published >= 9
            assert holders(settings) == {p: backend_pid(standby) for p in ALL}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.services
def test_notify_wakes_an_idle_relay_long_before_its_poll_interval(store: EventStore, settings: Settings) -> None:
    relay = new_relay(settings, poll_interval=30.0)  # polling alone would take up to 30 s
    reader = consumer(settings)
    tps = [TopicPartition(settings.events_topic, p) for p in sorted(ALL)]
    reader.assign(tps)
    reader.seek_to_end(*tps)
    for tp in tps:
        reader.position(tp)
    try:
        with running(relay):
            wait_for(lambda: set(holders(settings)) == ALL, 10, "the relay to take its leases")
            latencies = []
            for i in range(3):
                time.sleep(0.3)  # let the relay go back to waiting
                event = sample_event(f"sample-notify-{i}")
                started = time.monotonic()
                store.append(f"sample-notify-{i}", event)
                seen = False
                while not seen and time.monotonic() - started < 10:
                    for messages in reader.poll(timeout_ms=50).values():
                        seen = seen or any(dict(m.headers)[HEADER_EVENT_ID] == str(event.event_id).encode() for m in messages)
                latencies.append(time.monotonic() - started)
        assert max(latencies) < 2.0, f"append -> on topic took {latencies} s"
    finally:
        reader.close()


@pytest.mark.services
def test_flush_hands_its_leases_back_so_a_running_relay_keeps_publishing(store: EventStore, settings: Settings) -> None:
    """A producer that flushes while no relay runs must not keep the partitions from the relay started later."""
    fill(store, 6, "flushed")
    assert store.flush() == 6
    assert holders(settings) == {}
    with running(new_relay(settings, poll_interval=0.2)) as relay:
        wait_for(lambda: set(holders(settings)) == ALL, 10, "the relay to take every lease")
        fill(store, 6, "relayed")
        assert_published(settings)
        assert relay.published == 6
