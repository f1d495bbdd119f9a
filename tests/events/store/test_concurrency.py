"""Concurrent writers against the real ledger: no lost update, no gap, conflicts reported.

Each writer is a thread with its own PostgreSQL connection (its own :class:`Ledger`), as
separate producer processes would be. Events are encoded up front on the main thread, so
the threads exercise exactly the part that must be safe under concurrency: the ledger.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from hypothesis import Phase
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from events.adapters import postgres
from events.store.client import EventStore
from events.errors import ConcurrencyError
from events.event import ANY, NO_STREAM, AppendResult, EncodedEvent, ExpectedVersion
from events.store.ledger import Ledger
from events.settings import Settings
from tests.faults.helpers import assert_topic_matches_ledger, read_ledger, read_topic, sample_event

pytestmark = pytest.mark.services

WRITERS = 3
STREAMS = 3


@dataclass
class Context:
    """What outlives one hypothesis example: connections, and every success so far."""

    store: EventStore
    writers: list[Ledger]
    successes: dict[str, list[uuid.UUID]] = field(default_factory=dict)


@pytest.fixture
def context(store: EventStore, settings: Settings) -> Iterator[Context]:
    conns = [postgres.connect(settings.database_url, autocommit=True) for _ in range(WRITERS)]
    yield Context(store, [Ledger(conn, settings.partitions) for conn in conns])
    for conn in conns:
        conn.close()


@dataclass(frozen=True)
class Attempt:
    writer: int
    stream_id: str
    expected: ExpectedVersion
    batch: tuple[EncodedEvent, ...]


def run_together(writers: Sequence[Ledger], attempts: Sequence[Attempt]) -> list[AppendResult | BaseException]:
    """Start every attempt at once (a barrier), each on its writer's own connection."""
    barrier = threading.Barrier(len(attempts))
    outcomes: list[AppendResult | BaseException] = [RuntimeError("did not finish")] * len(attempts)

    def go(i: int, attempt: Attempt) -> None:
        barrier.wait()
        try:
            outcomes[i] = writers[attempt.writer].append(attempt.stream_id, attempt.batch, attempt.expected)
        except BaseException as err:  # noqa: BLE001 - judged by the caller
            outcomes[i] = err

    threads = [threading.Thread(target=go, args=(i, a)) for i, a in enumerate(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def matches(expected: ExpectedVersion, current: int) -> bool:
    return expected is ANY or (expected is NO_STREAM and current == 0) or expected == current


class WritersMachine(RuleBasedStateMachine):
    """Writers read a stream, then append concurrently with the version they read.

    The model is the list of event ids each stream must hold. Per stream and step: if any
    writer's expected version matches, exactly one of those writers wins and every other
    writer gets ConcurrencyError; with ANY, every writer wins, in some order.
    """

    context: ClassVar[Context]

    def __init__(self) -> None:
        super().__init__()
        run = uuid.uuid4().hex[:8]
        self.streams = [f"sample-{run}-{k}" for k in range(STREAMS)]
        self.model: dict[str, list[uuid.UUID]] = {s: [] for s in self.streams}
        self.seen: dict[tuple[int, str], int | None] = {}
        self.committed: list[tuple[str, tuple[EncodedEvent, ...], AppendResult]] = []

    def _batch(self, stream_id: str, size: int) -> tuple[EncodedEvent, ...]:
        return tuple(self.context.store.prepare(sample_event(stream_id)) for _ in range(size))

    @rule(writer=st.integers(0, WRITERS - 1), stream=st.integers(0, STREAMS - 1))
    def read(self, writer: int, stream: int) -> None:
        stream_id = self.streams[stream]
        self.seen[(writer, stream_id)] = self.context.writers[writer].version(stream_id)

    @rule(
        plan=st.lists(
            st.tuples(st.integers(0, WRITERS - 1), st.integers(0, STREAMS - 1), st.integers(1, 3)),
            min_size=1, max_size=WRITERS, unique_by=lambda t: t[0],
        ),
        blind=st.booleans(),
    )
    def append_together(self, plan: list[tuple[int, int, int]], blind: bool) -> None:
        attempts = []
        for writer, stream, size in plan:
            stream_id = self.streams[stream]
            last = self.seen.get((writer, stream_id))
            expected: ExpectedVersion = ANY if blind else (NO_STREAM if last is None else last)
            attempts.append(Attempt(writer, stream_id, expected, self._batch(stream_id, size)))
        outcomes = run_together(self.context.writers, attempts)
        for stream_id in self.streams:
            mine = [(a, o) for a, o in zip(attempts, outcomes) if a.stream_id == stream_id]
            if mine:
                self._judge(stream_id, mine)

    def _judge(self, stream_id: str, mine: list[tuple[Attempt, AppendResult | BaseException]]) -> None:
        current = len(self.model[stream_id])
        eligible = [a for a, _ in mine if matches(a.expected, current)]
        winners = [(a, o) for a, o in mine if isinstance(o, AppendResult)]
        for attempt, outcome in mine:
            if not isinstance(outcome, AppendResult):
                assert isinstance(outcome, ConcurrencyError), f"{attempt.expected}: {outcome!r}"
                assert outcome.stream_id == stream_id
        blind = all(a.expected is ANY for a, _ in mine)
        assert len(winners) == (len(mine) if blind else min(1, len(eligible))), (current, mine)
        assert all(a in eligible for a, _ in winners)
        for attempt, result in sorted(winners, key=lambda w: w[1].first_version):  # type: ignore[union-attr]
            assert isinstance(result, AppendResult) and not result.duplicate
            assert result.first_version == len(self.model[stream_id]) + 1
            self.model[stream_id].extend(e.event_id for e in attempt.batch)
            self.committed.append((stream_id, attempt.batch, result))

    @precondition(lambda self: bool(self.committed))
    @rule(writer=st.integers(0, WRITERS - 1), pick=st.integers(0, 10**6), expected=st.sampled_from([ANY, NO_STREAM, 0, 7]))
    def retry(self, writer: int, pick: int, expected: ExpectedVersion) -> None:
        """A retry after success, on any connection and with any expected version, is a no-op."""
        stream_id, batch, original = self.committed[pick % len(self.committed)]
        again = self.context.writers[writer].append(stream_id, batch, expected)
        assert again.duplicate and again.positions == original.positions

    @invariant()
    def no_lost_update_and_no_gap(self) -> None:
        ledger = self.context.store.ledger
        for stream_id, ids in self.model.items():
            recorded = ledger.read_stream(stream_id) if ids else []
            assert [e.version for e in recorded] == list(range(1, len(ids) + 1)), stream_id
            assert [e.event_id for e in recorded] == ids, stream_id
            assert ledger.version(stream_id) == (len(ids) or None)

    def teardown(self) -> None:
        self.context.successes.update({s: ids for s, ids in self.model.items() if ids})


def test_concurrent_writers_keep_the_ledger_and_the_topic_consistent(context: Context, settings: Settings) -> None:
    WritersMachine.context = context
    run_state_machine_as_test(
        WritersMachine,
        # Races do not replay step for step, so shrinking one only burns minutes: report it as found.
        settings=hypothesis_settings(
            max_examples=10, stateful_step_count=10, deadline=None, phases=[Phase.explicit, Phase.generate]
        ),
    )
    context.store.flush()
    ledger = read_ledger(settings.database_url)
    assert {s: [i for _, i in events] for s, events in ledger.items()} == context.successes
    check = assert_topic_matches_ledger(read_topic(settings), ledger)
    assert check.events == sum(len(ids) for ids in context.successes.values()) > 0


def test_threads_retrying_on_conflict_lose_nothing(store: EventStore, settings: Settings) -> None:
    threads, per_thread = 4, 50
    streams = [f"sample-shared-{k}" for k in range(3)]
    planned = [[store.prepare(sample_event(f"t{t}-{i}")) for i in range(per_thread)] for t in range(threads)]
    conflicts = [0] * threads
    failures: list[BaseException] = []

    def work(t: int) -> None:
        conn = postgres.connect(settings.database_url, autocommit=True)
        ledger = Ledger(conn, settings.partitions)
        try:
            for i, event in enumerate(planned[t]):
                stream_id = streams[(t + i) % len(streams)]
                while True:
                    version = ledger.version(stream_id)
                    try:
                        ledger.append(stream_id, [event], NO_STREAM if version is None else version)
                        break
                    except ConcurrencyError:
                        conflicts[t] += 1
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)
        finally:
            conn.close()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not failures, failures
    ledger = read_ledger(settings.database_url)
    assert sum(store.ledger.version(s) or 0 for s in streams) == threads * per_thread
    for stream_id in streams:
        assert [v for v, _ in ledger[stream_id]] == list(range(1, len(ledger[stream_id]) + 1))
    recorded = sorted(i for events in ledger.values() for _, i in events)
    assert recorded == sorted(e.event_id for batch in planned for e in batch)
    print(f"threaded appends: {threads * per_thread} appended, {sum(conflicts)} conflicts retried")


def test_blind_writers_racing_to_create_a_stream_all_succeed(context: Context) -> None:
    """ANY promises no conflict, including when several writers create the same stream at once."""
    for round_ in range(15):
        stream_id = f"sample-race-{round_}-{uuid.uuid4().hex[:6]}"
        attempts = [Attempt(w, stream_id, ANY, (context.store.prepare(sample_event(stream_id)),)) for w in range(WRITERS)]
        outcomes = run_together(context.writers, attempts)
        assert all(isinstance(o, AppendResult) for o in outcomes), outcomes
        assert sorted(o.first_version for o in outcomes) == list(range(1, WRITERS + 1))  # type: ignore[union-attr]
