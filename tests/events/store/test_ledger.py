"""The stream ledger against real PostgreSQL: expected versions, idempotency, atomicity, reservations.

One database and one store serve the whole module (opening a store registers schemas and
creates topics, which costs seconds); every test uses stream ids of its own.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.adapters import postgres
from events.store.client import EventStore
from events.errors import ConcurrencyError, EvpError, InvalidEvent, OutcomeUnknown, SchemaError, UniquenessViolation
from events.ops.forget import forget_subject
from events.privacy.personal import blind_index
from events.event import ANY, NO_STREAM, Event, ExpectedVersion
from events.store.ledger import MAX_EVENT_BYTES, Ledger
from events.settings import Settings
from tests.conftest import create_database, drop_database
from tests.faults.helpers import sample_event, wait_for

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def shared_settings(services: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    url = create_database(services)
    home = tmp_path_factory.mktemp("ledger") / "home"
    yield services.with_(database_url=url, topic_prefix=f"t{uuid.uuid4().hex[:10]}", home=home, kek_file=home / "kek")
    drop_database(services, url)


@pytest.fixture(scope="module")
def store(shared_settings: Settings) -> Iterator[EventStore]:
    with EventStore.open(shared_settings) as opened:
        yield opened


def new_stream() -> str:
    return f"sample-{uuid.uuid4().hex[:12]}"


def events(stream_id: str, n: int) -> list[Event]:
    return [sample_event(stream_id, label=i % 10) for i in range(n)]


def counts(store: EventStore) -> tuple[int, int, int]:
    """(events, outbox rows, streams): what "nothing was written" is checked against."""
    with postgres.connect(store.settings.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM evp_events), (SELECT count(*) FROM evp_outbox), (SELECT count(*) FROM evp_streams)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def versions(store: EventStore, stream_id: str) -> list[int]:
    return [e.record.version for e in store.read_stream(stream_id)]


# -- expected versions ----------------------------------------------------------------------
EXPECTED = st.one_of(st.integers(0, 4), st.just(ANY), st.just(NO_STREAM))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(existing=st.integers(0, 3), batch=st.integers(1, 3), expected=EXPECTED)
def test_an_append_succeeds_exactly_when_its_expected_version_matches(
    store: EventStore, existing: int, batch: int, expected: ExpectedVersion
) -> None:
    stream_id = new_stream()
    if existing:
        store.append(stream_id, events(stream_id, existing), NO_STREAM)
    should_succeed = expected is ANY or (expected is NO_STREAM and existing == 0) or expected == existing
    before = counts(store)
    attempt = events(stream_id, batch)
    if should_succeed:
        result = store.append(stream_id, attempt, expected)
        assert (result.first_version, result.last_version, result.duplicate) == (existing + 1, existing + batch, False)
        assert list(result.positions) == sorted(result.positions) and len(result.positions) == batch
        assert versions(store, stream_id) == list(range(1, existing + batch + 1))
        assert store.ledger.version(stream_id) == existing + batch
    else:
        with pytest.raises(ConcurrencyError) as caught:
            store.append(stream_id, attempt, expected)
        err = caught.value
        assert (err.stream_id, err.expected, err.actual) == (stream_id, expected, existing or None)
        assert stream_id in str(err) and str(expected) in str(err)
        assert counts(store) == before
        assert all(store.ledger.event_by_id(e.event_id) is None for e in attempt)


def test_no_stream_on_an_existing_stream_names_its_actual_version(store: EventStore) -> None:
    stream_id = new_stream()
    store.append(stream_id, events(stream_id, 2))
    with pytest.raises(ConcurrencyError, match=rf"{stream_id}.*expected version no stream, actual 2"):
        store.append(stream_id, events(stream_id, 1), NO_STREAM)
    assert store.ledger.version(stream_id) == 2


@pytest.mark.parametrize("bad", [-1, True, "3", 2.0])
def test_a_malformed_expected_version_is_rejected_by_name(store: EventStore, bad: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        store.append(new_stream(), sample_event("s"), bad)  # type: ignore[arg-type]
    assert caught.value.field == "expected_version"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_versions_are_gap_free_and_results_report_them(store: EventStore, batches: list[int]) -> None:
    stream_id, last = new_stream(), 0
    for size in batches:
        result = store.append(stream_id, events(stream_id, size), last if last else NO_STREAM)
        assert (result.first_version, result.last_version) == (last + 1, last + size)
        last += size
    recorded = store.ledger.read_stream(stream_id)
    assert [e.version for e in recorded] == list(range(1, last + 1))
    assert [e.position for e in recorded] == sorted(e.position for e in recorded)
    assert store.ledger.read_stream(stream_id, from_version=last) == recorded[-1:]


# -- idempotency ----------------------------------------------------------------------------
def test_a_retry_returns_the_original_positions_and_writes_nothing(store: EventStore) -> None:
    stream_id = new_stream()
    batch = events(stream_id, 3)
    first = store.append(stream_id, batch, NO_STREAM)
    before = counts(store)
    for expected in (NO_STREAM, 0, 3, 99, ANY):  # after commit the expected version no longer matters
        again = store.append(stream_id, batch, expected)
        assert again.duplicate is True
        assert (again.first_version, again.last_version, again.positions) == (1, 3, first.positions)
    assert counts(store) == before
    assert store.ledger.version(stream_id) == 3


def test_an_event_id_reused_in_another_stream_is_invalid_and_writes_nothing(store: EventStore) -> None:
    stream_id, other = new_stream(), new_stream()
    batch = events(stream_id, 2)
    store.append(stream_id, batch)
    before = counts(store)
    for attempt in ([batch[0]], [sample_event(other), batch[1]]):
        with pytest.raises(InvalidEvent) as caught:
            store.append(other, attempt)
        assert caught.value.field == "event_id"
    assert counts(store) == before
    assert store.ledger.version(other) is None


def test_a_retry_that_mixes_old_and_new_ids_is_invalid(store: EventStore) -> None:
    stream_id = new_stream()
    batch = events(stream_id, 2)
    store.append(stream_id, batch)
    before = counts(store)
    with pytest.raises(InvalidEvent, match="partly appended") as caught:
        store.append(stream_id, [batch[0], sample_event(stream_id)])
    assert caught.value.field == "event_id"
    assert counts(store) == before


def test_the_same_id_twice_in_one_batch_is_invalid(store: EventStore) -> None:
    event = sample_event("s")
    with pytest.raises(InvalidEvent) as caught:
        store.append(new_stream(), [event, event])
    assert caught.value.field == "event_id"


# -- invalid input never reaches the ledger -------------------------------------------------
def test_an_oversized_event_is_invalid_and_nothing_of_its_batch_is_written(store: EventStore) -> None:
    stream_id = new_stream()
    huge = Event("SampleSubmitted", {"sample_id": stream_id, "annotator_id": "a", "features": [1.0] * (MAX_EVENT_BYTES // 4 + 1), "label": 1})
    before = counts(store)
    with pytest.raises(InvalidEvent) as caught:
        store.append(stream_id, [sample_event(stream_id), huge])
    assert str(MAX_EVENT_BYTES) in str(caught.value)
    assert counts(store) == before


def test_an_unknown_event_type_is_a_schema_error_before_anything_is_written(store: EventStore) -> None:
    stream_id = new_stream()
    before = counts(store)
    with pytest.raises(SchemaError, match="NoSuchThing"):
        store.append(stream_id, [sample_event(stream_id), Event("NoSuchThing", {"x": 1})])
    assert counts(store) == before


@pytest.mark.parametrize(
    ("field", "value"), [("label", "three"), ("features", "not a list"), ("sample_id", None), ("annotator_id", 7)]
)
def test_an_invalid_field_is_named_and_nothing_is_written(store: EventStore, field: str, value: object) -> None:
    stream_id = new_stream()
    bad = Event("SampleSubmitted", {**sample_event(stream_id).data, field: value})
    before = counts(store)
    with pytest.raises(InvalidEvent) as caught:
        store.append(stream_id, [sample_event(stream_id), bad])
    assert caught.value.field == field
    assert field in str(caught.value)
    assert counts(store) == before


@pytest.mark.parametrize("where", ["actor", "subject_id", "stream_id"])
def test_text_postgresql_cannot_store_is_invalid_by_name_and_nothing_is_written(store: EventStore, where: str) -> None:
    stream_id = new_stream()
    good = sample_event(stream_id)
    bad = {
        "actor": Event("SampleSubmitted", good.data, actor="ann\x00-1"),
        "subject_id": Event("SampleSubmitted", {**good.data, "annotator_id": "ann\x00-1"}),
        "stream_id": sample_event(stream_id),
    }[where]
    before = counts(store)
    with pytest.raises(InvalidEvent) as caught:
        store.append(stream_id + "\x00" if where == "stream_id" else stream_id, [good, bad])
    assert caught.value.field == where
    assert counts(store) == before


# -- a connection lost mid-append -------------------------------------------------------------
def _blocked_on_lock(watcher: psycopg.Connection, pid: int) -> bool:
    row = watcher.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


def test_a_connection_killed_mid_batch_leaves_nothing_half_written(store: EventStore, shared_settings: Settings) -> None:
    """Hold the outbox table so the append stops after inserting its events, then kill its session."""
    stream_id = new_stream()
    store.append(stream_id, events(stream_id, 2))
    batch = [store.prepare(e) for e in events(stream_id, 5)]
    victim_conn = postgres.connect(shared_settings.database_url, autocommit=True)
    victim, victim_pid = Ledger(victim_conn, shared_settings.partitions), victim_conn.info.backend_pid
    outcome: list[BaseException] = []

    def append() -> None:
        try:
            victim.append(stream_id, batch, 2)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    with postgres.connect(shared_settings.database_url) as holder, postgres.connect(shared_settings.database_url, autocommit=True) as watcher:
        holder.execute("LOCK TABLE evp_outbox IN EXCLUSIVE MODE")
        writer = threading.Thread(target=append)
        writer.start()
        wait_for(lambda: _blocked_on_lock(watcher, victim_pid), 10, "the append to block on the outbox")
        inserted = watcher.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND relation = 'evp_events'::regclass", (victim_pid,)).fetchone()
        assert inserted and inserted[0] > 0, "the append should hold evp_events locks: its event rows are written"
        watcher.execute("SELECT pg_terminate_backend(%s)", (victim_pid,))
        writer.join(10)
        holder.rollback()
    # The client sent the append (its commit) and lost the session: from its side a kill
    # before the commit looks like one after it, so it says it cannot know.
    assert len(outcome) == 1 and isinstance(outcome[0], OutcomeUnknown), outcome
    assert "the outcome is unknown" in str(outcome[0])
    assert store.ledger.version(stream_id) == 2
    assert all(store.ledger.event_by_id(e.event_id) is None for e in batch)
    # The same batch, retried on a fresh connection, goes through once.
    assert store.ledger.append(stream_id, batch, 2).last_version == 7
    with pytest.raises(EvpError):  # and the dead connection keeps saying so, never half-works
        victim.append(stream_id, batch, 7)


def test_a_closed_connection_is_an_evp_error(store: EventStore, shared_settings: Settings) -> None:
    stream_id = new_stream()
    encoded = store.prepare(sample_event(stream_id))
    conn = postgres.connect(shared_settings.database_url, autocommit=True)
    ledger = Ledger(conn, shared_settings.partitions)
    conn.close()
    with pytest.raises(EvpError, match="nothing was written"):
        ledger.append(stream_id, [encoded])
    assert store.ledger.version(stream_id) is None


# -- reservations ---------------------------------------------------------------------------
def register(annotator_id: str, email: str) -> Event:
    return Event("AnnotatorRegistered", {"annotator_id": annotator_id, "name": "Ada", "email": email})


def test_a_second_stream_reserving_the_same_email_is_refused_and_rolled_back(store: EventStore) -> None:
    """``evp.unique`` on the email field: the SDK reserves its blind index with every append."""
    first, second = new_stream(), new_stream()
    store.append(first, register(first, "ada@example.org"), NO_STREAM)
    before = counts(store)
    attempt = register(second, " Ada@Example.ORG")  # the same email once normalised
    with pytest.raises(UniquenessViolation, match=first):
        store.append(second, attempt, NO_STREAM)
    assert counts(store) == before
    assert store.ledger.version(second) is None and store.ledger.event_by_id(attempt.event_id) is None
    # The holder may append under its own reservation again; once released, the other may take it.
    store.append(first, register(first, "ada@example.org"), 1)
    index = blind_index(store.keyring, "annotator-email", "ada@example.org")
    assert store.ledger.release("annotator-email", index, first)
    assert store.append(second, attempt, NO_STREAM).last_version == 1


def test_forgetting_a_subject_releases_only_that_subjects_reservations(store: EventStore) -> None:
    team = new_stream()
    store.append(team, [register("ann-a", "a@example.org"), register("ann-b", "b@example.org")], NO_STREAM)
    assert store.ledger.reservations_of("ann-a") == 1 and store.ledger.reservations_of("ann-b") == 1
    report = forget_subject(store, "ann-a", reason="test")
    assert report.reservations == 1
    assert store.ledger.reservations_of("ann-a") == 0 and store.ledger.reservations_of("ann-b") == 1
    with pytest.raises(UniquenessViolation):  # b's email is still taken, on the same stream
        store.append(new_stream(), register("ann-c", "b@example.org"), NO_STREAM)
    store.append(new_stream(), register("ann-d", "a@example.org"), NO_STREAM)  # a's is free again


def test_an_invalid_personal_value_is_refused_without_repeating_it(store: EventStore) -> None:
    secret = "Ada-" + uuid.uuid4().hex
    bad = Event("AnnotatorRegistered", {"annotator_id": "a-1", "name": 12345, "email": secret})
    with pytest.raises(InvalidEvent) as caught:
        store.append(new_stream(), bad)
    assert caught.value.field == "name" and "12345" not in str(caught.value)
    non_personal = Event("SampleSubmitted", {"sample_id": "s", "annotator_id": "a", "features": [0.0], "label": "x"})
    with pytest.raises(InvalidEvent, match="label"):  # a non-personal field keeps its full reason
        store.append(new_stream(), non_personal)
