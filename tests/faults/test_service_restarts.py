"""Restart Kafka or PostgreSQL under load; the core must lose nothing and duplicate no effect.

Writers and the relay run as threads here: what is killed is the service, not them. A
writer that meets an outage reopens its store and retries the same events (same ids, same
expected version), which must be idempotent: a retry of an append that did commit comes
back as a duplicate, one that did not goes through.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import ContextManager

import pytest

from events.store.client import EventStore
from events.store.relay import Relay
from events.settings import Settings
from tests.faults.helpers import (
    JournalEntry,
    WriterStats,
    assert_journal_consistent,
    assert_topic_matches_ledger,
    outbox_depth,
    read_journal,
    read_ledger,
    read_topic,
    services,
    summary_line,
    wait_for,
    write_loop,
)

pytestmark = [pytest.mark.faults, pytest.mark.services]


@pytest.fixture
def restore_services(settings: Settings) -> Iterator[None]:
    """Bring both services back whatever happened (set up after, so torn down before, the database)."""
    yield
    for service in ("postgres", "kafka"):
        services("up", service)


def relay_running(settings: Settings) -> ContextManager[Relay]:
    relay = Relay(settings, poll_interval=0.2)
    return relay.in_background()


@contextmanager
def writers_running(settings: Settings, journals: list[Path], pause: float) -> Iterator[list[Future[WriterStats]]]:
    """One writer thread per journal, on overlapping streams, stopped when the block ends."""
    stop = threading.Event()
    streams = [f"sample-restart-{i}" for i in range(3)]
    with ExitStack() as files, ThreadPoolExecutor(len(journals)) as pool:
        futures = [
            pool.submit(
                write_loop, lambda: EventStore.open(settings), streams, 10**6, files.enter_context(open(path, "a")),
                random.Random(i), stop=stop, pause=pause,
            )
            for i, path in enumerate(journals)
        ]
        try:
            yield futures
        finally:
            stop.set()


def under_load(
    settings: Settings, tmp_path: Path, writers: int, fault: Callable[[], object], pause: float = 0.02
) -> tuple[list[WriterStats], dict[str, object]]:
    """Run writers and a relay, inject ``fault`` mid-stream, then check the topic against the ledger."""
    EventStore.open(settings).close()  # topics and schema tables exist before the relay starts
    journals = [tmp_path / f"journal-{i}.jsonl" for i in range(writers)]

    def journal() -> list[JournalEntry]:
        return [entry for path in journals for entry in read_journal(path)]

    with relay_running(settings) as relay:
        with writers_running(settings, journals, pause) as futures:
            wait_for(lambda: relay.published >= 10, 30, "the relay to publish")
            published_before = relay.published
            started = time.monotonic()
            fault()
            outage = time.monotonic() - started
            appended_at_restart = len(journal())
            wait_for(lambda: len(journal()) > appended_at_restart + 10, 60, "writers to append after the restart")
        stats = [f.result() for f in futures]
        wait_for(lambda: outbox_depth(settings.database_url) == 0, 90, "the relay to drain the outbox after the restart")
        published_after = relay.published - published_before
    ledger = read_ledger(settings.database_url)
    check = assert_topic_matches_ledger(read_topic(settings), ledger)
    journal_check = assert_journal_consistent(journal(), ledger)
    assert published_after > 0
    facts: dict[str, object] = {
        "restart_s": round(outage, 1),
        "events": check.events,
        "republished_duplicates": check.duplicates,
        "acked_appends": journal_check.acknowledged,
        "conflicts": sum(s.conflicts for s in stats),
        "outage_reopens": sum(s.outage_retries for s in stats),
        "append_errors_retried": sum(len(s.errors) for s in stats),
        "retries_found_committed": sum(s.duplicate_retries for s in stats),
        "committed_but_unacked": journal_check.committed_unacknowledged,
    }
    return stats, facts


def test_a_kafka_restart_while_the_relay_publishes_loses_nothing(
    settings: Settings, tmp_path: Path, restore_services: None, record_property: Callable[[str, object], None]
) -> None:
    _, facts = under_load(settings, tmp_path, 1, lambda: services("restart", "kafka"))
    for key, value in facts.items():
        record_property(key, value)
    print("\n" + summary_line("kafka restart", facts))


def test_a_postgres_restart_under_writers_and_relay_loses_nothing_and_retries_are_idempotent(
    settings: Settings, tmp_path: Path, restore_services: None, record_property: Callable[[str, object], None]
) -> None:
    def restart_twice() -> None:  # busy writers (no pause) meet it mid-append, not only between appends
        for _ in range(2):
            services("restart", "postgres")
            time.sleep(1.0)

    stats, facts = under_load(settings, tmp_path, 2, restart_twice, pause=0.0)
    assert any(s.outage_retries for s in stats), "no writer met the outage: the restart tested nothing"
    # OutcomeUnknown: an append sent as the server went down; the writer's retry of the same ids settles it.
    expected = {"EvpError", "ServiceUnavailable", "OutcomeUnknown"}
    assert all(s.errors == [] or set(s.errors) <= expected for s in stats), [s.errors for s in stats]
    for key, value in facts.items():
        record_property(key, value)
    print("\n" + summary_line("postgres restart", facts))
