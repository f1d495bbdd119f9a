"""The samples view: the batch reduction, the fold against real services, sealed annotators."""

from __future__ import annotations

import random
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from events.store.client import EventStore
from events.errors import InvalidEvent
from events.event import Event
from events.store.log import LogRecord
from events.privacy.personal import blind_index
from events.settings import Settings
from projections.runner import ProjectionRunner
from projections.samples import Changes, SamplesView, net_changes
from tests.projections import ExpectedView, assert_view, corrected, random_ops, retracted, submitted

# -- the batch reduction, pure -------------------------------------------------------------


def _record(n: int, kind: str, sample: str, label: int) -> LogRecord:
    data: dict[str, Any] = {"sample_id": sample, "annotator_id": "a", "label": label}
    if kind == "SampleSubmitted":
        data |= {"features": [float(label)] * 3, "source": "s"}
    return LogRecord(partition=0, offset=n, stream_id=f"sample-{sample}", version=n + 1, event_id=uuid.uuid4(),
                     event_type=f"evp.samples.{kind}", schema_id=1, actor="", occurred_at="", data=data)


def _interpret(state: dict[str, tuple[Any, ...]], changes: Changes) -> dict[str, tuple[Any, ...]]:
    """What :func:`projections.samples.write` does to the table, on a dict."""
    out = dict(state)
    for sample in changes.deletes:
        out.pop(sample, None)
    for change in changes.label_changes:
        if change.sample_id in out:
            features, _, _, count, _ = out[change.sample_id]
            out[change.sample_id] = (features, change.label, True, count + change.count, change.version)
    for row in changes.puts:
        out[row.sample_id] = (row.features, row.label, row.corrected, row.corrections, row.version)
    return out


records_strategy = st.lists(
    st.tuples(st.sampled_from(["SampleSubmitted", "LabelCorrected", "SampleRetracted"]),
              st.sampled_from("abcd"), st.integers(0, 9)),
    max_size=25,
)
state_strategy = st.dictionaries(st.sampled_from("abcd"), st.integers(0, 9).map(lambda l: ((0.0,), l, False, 0, 1)))


@given(records_strategy, state_strategy)
def test_a_batch_reduces_to_the_same_effect_as_one_record_at_a_time(ops: list[tuple[str, str, int]], state: dict) -> None:
    records = [_record(n, kind, sample, label) for n, (kind, sample, label) in enumerate(ops)]
    one_by_one = state
    for record in records:
        one_by_one = _interpret(one_by_one, net_changes([record]))
    changes = net_changes(records)
    touched = changes.deletes + tuple(c.sample_id for c in changes.label_changes) + tuple(r.sample_id for r in changes.puts)
    assert len(touched) == len(set(touched)), "a sample must be in one list only, so the write order cannot matter"
    assert _interpret(state, changes) == one_by_one


def test_a_record_the_view_cannot_hold_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidEvent, match="sample_id"):
        net_changes([_record(0, "SampleSubmitted", "", 1)])
    plaintext = LogRecord(0, 0, "annotator-x", 1, uuid.uuid4(), "evp.samples.AnnotatorRegistered", 1, "", "",
                          {"annotator_id": "x", "name": "Ann", "email": "a@b.c", "email_index": "00"})
    with pytest.raises(InvalidEvent, match="name.*unencrypted"):
        net_changes([plaintext])


def test_other_event_types_are_ignored() -> None:
    other = LogRecord(0, 0, "run-1", 1, uuid.uuid4(), "evp.platform.TrainingRunRecorded", 1, "", "", {"run_id": "x"})
    assert net_changes([other]) == Changes()


def test_an_erasure_is_carried_as_a_subject_to_redact() -> None:
    forgotten = LogRecord(0, 0, "erasure-x", 1, uuid.uuid4(), "evp.platform.SubjectForgotten", 1, "", "",
                          {"subject_id": "x", "reason": "request"})
    assert net_changes([forgotten]) == Changes(forgotten=("x",))


# -- against the real services -------------------------------------------------------------


@pytest.mark.services
def test_view_equals_the_fold_of_submissions_corrections_and_retractions(store: EventStore, settings: Settings) -> None:
    expected = ExpectedView()
    for i in range(40):
        expected.append(store, f"sample-s{i}", submitted(f"s{i}", "a1", i % 10, i, i))
    for i in range(0, 40, 3):
        expected.append(store, f"sample-s{i}", corrected(f"s{i}", "a1", (i + 1) % 10, i % 10))
    for i in range(0, 40, 5):
        expected.append(store, f"sample-s{i}", retracted(f"s{i}", "a1"))
    # corrections after a retraction, and a whole stream in one append
    expected.append(store, "sample-s5", corrected("s5", "a1", 7))
    expected.append(store, "sample-t", [submitted("t", "a1", 1, 2, 99), corrected("t", "a1", 2), corrected("t", "a1", 3)])
    store.flush()
    with ProjectionRunner(settings, SamplesView()) as runner:
        result = runner.catch_up()
    assert result.applied == sum(expected.versions.values()) and result.dead_lettered == 0
    with psycopg.connect(settings.database_url) as conn:
        assert_view(conn, expected.rows)
        assert len(expected.rows) == 40 - 8 + 1  # the fold itself is what we think
        assert expected.rows["t"]["label"] == 3 and expected.rows["t"]["corrected"] is True


@pytest.mark.services
def test_view_equals_the_fold_for_random_histories(store: EventStore, settings: Settings) -> None:
    expected = ExpectedView()
    with ProjectionRunner(settings, SamplesView(), batch_size=7) as runner:  # small batches: many boundaries

        @hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.integers(0, 2**32), st.integers(1, 25))
        def check(seed: int, count: int) -> None:
            prefix = f"h{uuid.uuid4().hex[:8]}-"
            random_ops(random.Random(seed), store, expected, prefix, count)
            store.flush()
            runner.catch_up()
            with psycopg.connect(settings.database_url) as conn:
                assert_view(conn, expected.restricted(prefix), prefix=prefix)

        check()


@pytest.mark.services
def test_annotators_keep_personal_data_sealed_and_openable(store: EventStore, settings: Settings) -> None:
    event = Event("AnnotatorRegistered", {"annotator_id": "ann-1", "name": "Ada Lovelace", "email": "ada@example.org"})
    store.append("annotator-ann-1", event)
    store.flush()
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT annotator_id, event_id, name_sealed, email_sealed, email_index, registered_at FROM evp_views.annotators"
        ).fetchone()
        everything = conn.execute("SELECT a::text FROM evp_views.annotators a").fetchone()[0]
    assert row is not None
    annotator_id, event_id, name_sealed, email_sealed, email_index, registered_at = row
    assert "Ada" not in everything and "ada@" not in everything, "plaintext personal data reached the view"
    assert name_sealed.startswith("evp1:") and email_sealed.startswith("evp1:")
    assert email_index == blind_index(store.keyring, "email", "ada@example.org")
    assert registered_at == event.occurred_at
    opened = store.personal.open(
        "evp.samples.AnnotatorRegistered", str(event_id),
        {"annotator_id": annotator_id, "name": name_sealed, "email": email_sealed, "email_index": email_index},
        store.keyring,
    )
    assert (opened["name"], opened["email"]) == ("Ada Lovelace", "ada@example.org")


def register(store: EventStore, annotator_id: str) -> None:
    store.append(f"annotator-{annotator_id}", Event("AnnotatorRegistered", {
        "annotator_id": annotator_id, "name": f"Name {annotator_id}", "email": f"{annotator_id}@example.org"}))


def forget_event(store: EventStore, subject_id: str) -> None:
    store.append(f"erasure-{subject_id}", Event("SubjectForgotten", {"subject_id": subject_id, "reason": "request"}))


@pytest.mark.services
def test_erasures_redact_annotators_whether_they_arrive_before_or_after_the_registration(
    store: EventStore, settings: Settings
) -> None:
    register(store, "a1")
    register(store, "a2")
    forget_event(store, "a1")
    forget_event(store, "b1")  # before b1 registers: the view must remember it
    store.flush()
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
    register(store, "b1")
    store.flush()
    with ProjectionRunner(settings, SamplesView()) as runner:
        runner.catch_up()
    with psycopg.connect(settings.database_url) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT annotator_id, erased, name_sealed IS NULL, email_sealed IS NULL, email_index IS NULL"
            " FROM evp_views.annotators")}
    assert rows == {"a1": (True, True, True, True), "b1": (True, True, True, True), "a2": (False, False, False, False)}
