"""Network faults between evp and its services, through toxiproxy (the real proxy, real services).

Each test opens its own proxy (tests/support/toxiproxy.py) and points only the traffic under
test through it: the ledger's connection for PostgreSQL (the keyring and Kafka stay direct,
so the one statement crossing the proxy is the append), the relay's producer for Kafka. Every
test asserts that its fault hit the window it names, from the other side of the proxy: the
ledger read directly, ``pg_stat_activity``, the topic read directly.
"""

from __future__ import annotations

import logging
import select
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from events.adapters import postgres
from events.adapters.kafka import producer
from events.errors import OutcomeUnknown, ServiceUnavailable
from events.event import NO_STREAM, Event
from events.settings import Settings
from events.store.client import EventStore
from events.store.relay import Relay
from tests.faults.helpers import (
    assert_topic_matches_ledger,
    outbox_depth,
    read_ledger,
    read_topic,
    sample_event,
    summary_line,
    wait_for,
)
from tests.support.toxiproxy import Proxy, Toxiproxy, ToxiproxyError, kafka_proxy, postgres_proxy

pytestmark = [pytest.mark.faults, pytest.mark.services]


@pytest.fixture(scope="module")
def toxiproxy() -> Toxiproxy:
    """The running toxiproxy; fails (never skips) with how to start it."""
    client = Toxiproxy()
    try:
        client.version()
    except ToxiproxyError as err:
        pytest.fail(str(err))
    return client


@dataclass(frozen=True)
class Behind:
    """A store whose ledger connection crosses ``proxy`` (its keyring's and Kafka's do not)."""

    proxy: Proxy
    settings: Settings  #: the ledger through the proxy
    direct_url: str  #: the same database, not through it: what the test reads back
    store: EventStore

    def batch(self, kind: str, n: int = 3) -> tuple[str, list[Event]]:
        """A new stream id and ``n`` events for it."""
        stream_id = f"sample-{kind}-{uuid.uuid4().hex[:8]}"
        return stream_id, [sample_event(f"{stream_id}-{i}") for i in range(n)]

    def ledger(self, stream_id: str) -> list[tuple[int, uuid.UUID]]:
        """The stream as the ledger holds it, read directly."""
        return read_ledger(self.direct_url).get(stream_id, [])


@pytest.fixture
def behind(settings: Settings, toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[Behind]:
    """A proxy in front of PostgreSQL and a store behind it that appended once already.

    The first append registers the schemas and makes the keys, so the appends a test makes
    are one statement each on the proxied connection.
    """
    with postgres_proxy(toxiproxy, settings.database_url, tmp_path / "proxy") as (proxy, url):
        proxied = settings.with_(database_url=url, keyring_database_url=settings.database_url)
        with EventStore.open(proxied) as store:
            store.append(f"sample-warm-{uuid.uuid4().hex[:8]}", sample_event("warm"))
            yield Behind(proxy, proxied, settings.database_url, store)


def assert_retry_is_a_duplicate(behind: Behind, stream_id: str, batch: list[Event]) -> None:
    """The same events again, on a new connection: answered as a duplicate, and in the ledger once."""
    with EventStore.open(behind.settings) as again:
        result = again.append(stream_id, batch, NO_STREAM)
    assert result.duplicate, result
    assert (result.first_version, result.last_version) == (1, len(batch))
    assert behind.ledger(stream_id) == [(i + 1, e.event_id) for i, e in enumerate(batch)]
    with postgres.connect(behind.direct_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM evp_events WHERE event_id = ANY(%s)",
                           ([e.event_id for e in batch],)).fetchone()
    assert row is not None and row[0] == len(batch), "an event landed more than once"


def assert_says_unknown(err: BaseException) -> None:
    message = str(err)
    assert "the outcome is unknown" in message, message
    assert "Retrying it with the same event ids (on a new connection) is safe" in message, message
    assert "as a duplicate" in message and "never as a conflict" in message, message
    assert "nothing was written" not in message, message


# -- PostgreSQL: what an append says when its connection is cut ------------------------------
def test_a_cut_after_the_commit_is_sent_says_the_outcome_is_unknown_and_the_retry_is_a_duplicate(
    behind: Behind,
) -> None:
    """reset_peer on the server's answers: the append reaches the server and commits; its answer is dropped."""
    stream_id, batch = behind.batch("cut")
    with behind.proxy.toxic("reset_peer", stream="downstream", timeout=0):
        with pytest.raises(OutcomeUnknown) as caught:
            behind.store.append(stream_id, batch, NO_STREAM)
    assert_says_unknown(caught.value)
    assert caught.value.stream_id == stream_id and caught.value.event_ids == tuple(e.event_id for e in batch)
    # The window was hit: the ledger, read directly, holds the append whose answer was lost.
    assert behind.ledger(stream_id) == [(i + 1, e.event_id) for i, e in enumerate(batch)]
    assert_retry_is_a_duplicate(behind, stream_id, batch)


def _waiting_on_lock(watcher: psycopg.Connection, pid: int) -> bool:
    row = watcher.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


def test_a_cut_while_the_append_runs_is_unknown_to_the_client_and_the_server_commits_after_it(behind: Behind) -> None:
    """The append waits on a lock inside the server; the proxy cuts it off; the lock is freed; it commits.

    Why "nothing was written" would be false there: the client learns of the cut while the
    server still runs the statement, and the server goes on to commit it.
    """
    stream_id, batch = behind.batch("inflight")
    victim = behind.store.ledger.connection.info.backend_pid
    with postgres.connect(behind.direct_url) as holder, postgres.connect(behind.direct_url, autocommit=True) as watcher, \
            ThreadPoolExecutor(1) as pool:
        holder.execute("LOCK TABLE evp_outbox IN EXCLUSIVE MODE")
        pending = pool.submit(behind.store.append, stream_id, batch, NO_STREAM)
        wait_for(lambda: _waiting_on_lock(watcher, victim), 10, "the append to wait on the outbox's lock")
        with behind.proxy.cut():
            failure = pending.exception(timeout=10)  # the client hears of the cut at once...
            assert _waiting_on_lock(watcher, victim), "the server should still be running the append after the cut"
            assert behind.ledger(stream_id) == []
            holder.rollback()  # ...the lock goes, and the server finishes the append its client gave up on
            wait_for(lambda: len(behind.ledger(stream_id)) == len(batch), 10, "the server to commit the cut-off append")
    assert isinstance(failure, OutcomeUnknown), failure
    assert_says_unknown(failure)
    assert_retry_is_a_duplicate(behind, stream_id, batch)


def test_a_cut_before_the_append_is_sent_says_nothing_was_written_and_nothing_was(behind: Behind) -> None:
    stream_id, batch = behind.batch("before")
    with behind.proxy.cut():
        poller = select.poll()
        poller.register(behind.store.ledger.connection.fileno(), select.POLLIN)
        wait_for(lambda: bool(poller.poll(0)), 5, "the cut to reach the client's socket")  # before the append
    with pytest.raises(ServiceUnavailable) as caught:
        behind.store.append(stream_id, batch, NO_STREAM)
    assert not isinstance(caught.value, OutcomeUnknown)
    message = str(caught.value)
    assert f"the connection was lost before the append to {stream_id!r} was sent, so nothing was written" in message
    assert behind.ledger(stream_id) == []
    # Nothing was written, so the same events go through as new ones.
    with EventStore.open(behind.settings) as again:
        result = again.append(stream_id, batch, NO_STREAM)
    assert not result.duplicate and result.last_version == len(batch)


def test_latency_and_small_packets_slow_an_append_but_do_not_break_it(behind: Behind) -> None:
    stream_id, batch = behind.batch("slow")
    with behind.proxy.toxic("latency", stream="upstream", latency=250), \
            behind.proxy.toxic("latency", stream="downstream", latency=250, jitter=20):
        started = time.monotonic()
        result = behind.store.append(stream_id, batch, NO_STREAM)
        slow = time.monotonic() - started
    assert not result.duplicate and result.last_version == 3
    assert 0.45 <= slow < 5.0, f"an append across 2 x 250 ms of latency took {slow:.2f}s"
    sliced_id, sliced = behind.batch("sliced")
    with behind.proxy.toxic("slicer", stream="upstream", average_size=64, size_variation=32, delay=200), \
            behind.proxy.toxic("slicer", stream="downstream", average_size=16, size_variation=8, delay=200):
        assert behind.store.append(sliced_id, sliced, NO_STREAM).last_version == 3
    assert len(behind.ledger(stream_id)) == 3 and len(behind.ledger(sliced_id)) == 3


# -- Kafka: a relay publishing through the proxy -------------------------------------------
#: The relay's producer detects a stall in 2 s and gives a batch up after 3 s (the defaults,
#: 15 s and 60 s, survive the same faults, only slower).
RELAY_TIMEOUTS = {"request_timeout_ms": 2_000, "delivery_timeout_ms": 3_000}


def append_round(store: EventStore, streams: list[str], n: int) -> list[uuid.UUID]:
    ids = []
    for i in range(n):
        event = sample_event(f"relay-{uuid.uuid4().hex[:8]}")
        store.append(streams[i % len(streams)], event)
        ids.append(event.event_id)
    return ids


def on_topic(settings: Settings, ids: list[uuid.UUID]) -> bool:
    found = {event_id for entries in read_topic(settings).values() for _, event_id in entries}
    return set(ids) <= found


def test_a_relay_publishing_through_the_proxy_survives_a_cut_a_stall_and_lost_acknowledgements(
    settings: Settings, toxiproxy: Toxiproxy, caplog: pytest.LogCaptureFixture,
    record_property: Callable[[str, object], None],
) -> None:
    streams = [f"sample-relay-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    caplog.set_level(logging.WARNING, logger="events.store.relay")
    with EventStore.open(settings) as store, kafka_proxy(toxiproxy) as proxy:
        behind = settings.with_(kafka=proxy.address)
        relay = Relay(behind, poll_interval=0.2, producer_factory=lambda: producer(behind, **RELAY_TIMEOUTS))
        drained = lambda: outbox_depth(settings.database_url) == 0  # noqa: E731
        with relay.in_background():
            append_round(store, streams, 10)
            wait_for(drained, 30, "the relay to publish through the proxy")

            # 1. A cut: nothing is published while the proxy is down, everything after.
            with proxy.cut():
                append_round(store, streams, 10)
                time.sleep(1.5)
                assert outbox_depth(settings.database_url) == 10, "the relay published during the cut: it bypasses the proxy"
            wait_for(drained, 30, "the relay to publish after the cut")

            # 2. A stall: the connection stays open and carries nothing, both ways.
            with proxy.toxic("timeout", stream="upstream", timeout=0), proxy.toxic("timeout", stream="downstream", timeout=0):
                append_round(store, streams, 10)
                time.sleep(1.5)
                assert outbox_depth(settings.database_url) == 10, "the relay published during the stall"
            wait_for(drained, 30, "the relay to publish after the stall")

            # 3. Acknowledgements lost: what the relay sends reaches the broker, nothing comes
            #    back; the broker stores the batch, the producer gives it up, and the relay sends
            #    it again once the proxy heals. One append, so one batch and one produce request.
            caplog.clear()  # the stall may have made the relay give a batch up already
            with proxy.toxic("timeout", stream="downstream", timeout=0):
                lost_batch = [sample_event(f"relay-lost-{i}") for i in range(10)]
                store.append(streams[0], lost_batch)
                lost = [e.event_id for e in lost_batch]
                wait_for(lambda: on_topic(settings, lost), 20, "the broker to store the batch whose answer is lost")
                assert outbox_depth(settings.database_url) == 10, "the relay marked events Kafka never acknowledged"
                wait_for(lambda: any("did not acknowledge" in r.getMessage() for r in caplog.records), 20,
                         "the relay to give the unacknowledged batch up")
            wait_for(drained, 30, "the relay to re-send the unacknowledged batch")
    check = assert_topic_matches_ledger(read_topic(settings), read_ledger(settings.database_url))
    assert check.events == 40
    assert check.duplicates >= 10, f"the re-sent batch should repeat on the topic, found {check.duplicates} duplicates"
    facts = {"events": check.events, "republished_duplicates": check.duplicates}
    for key, value in facts.items():
        record_property(key, value)
    print("\n" + summary_line("relay through toxiproxy", facts))
