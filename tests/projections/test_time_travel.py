"""A view as it was: ``evp projections rebuild NAME --until TIME | --position P --into SCHEMA``.

The oracle is :class:`tests.support.views.ExpectedSamples`, a plain fold written apart from
the runner: its state is remembered after every append, so the view replayed up to any
ledger position can be compared with what the fold held at that position.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from psycopg import sql

from events.errors import ConfigurationError
from events.settings import Settings
from events.store.client import EventStore
from events.store.cut import Cut, cut_at
from projections.rebuild import rebuild_as_of
from projections.runner import ProjectionRunner
from projections.tables import digest
from tests.support.cli import evp
from tests.support.cuts import recorded_at, resend
from tests.support.views import SAMPLES_SCHEMA, ExpectedSamples, SamplesView, corrected, random_op, sample_rows, submitted

pytestmark = pytest.mark.services

State = dict[str, dict[str, Any]]


def _history(store: EventStore, rng: random.Random, prefix: str, count: int) -> list[tuple[int, State]]:
    """Append ``count`` random operations; after each, its ledger position and the fold's rows of ``prefix``."""
    expected, states = ExpectedSamples(), []
    for n in range(count):
        stream, event = random_op(rng, expected, prefix, max(3, count // 3), n)
        position = store.append(stream, event).positions[0]
        expected.fold(stream, event.type, event.data, event.occurred_at)
        states.append((position, copy.deepcopy(expected.restricted(prefix))))
    store.flush()
    return states


def _cut(store: EventStore, position: int | None = None) -> Cut:
    return cut_at(store.ledger.connection, store.settings.partitions, position=position)


def _schema() -> str:
    return f"past_{uuid.uuid4().hex[:10]}"


# -- the property ----------------------------------------------------------------------------
@hsettings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False), count=st.integers(1, 24), data=st.data())
def test_a_view_rebuilt_until_a_position_is_the_fold_of_the_events_up_to_it(
    store: EventStore, settings: Settings, conn: psycopg.Connection[Any], rng: random.Random, count: int,
    data: st.DataObject,
) -> None:
    prefix = f"{uuid.uuid4().hex[:6]}-"
    states = _history(store, rng, prefix, count)
    first = states[0][0]
    # any position of this history, or the one just before it (nothing of this prefix yet)
    position, expected = data.draw(st.sampled_from([(first - 1, {}), *states]), label="cut")
    into = _schema()
    result = rebuild_as_of(settings, SamplesView(), _cut(store, position), into=into)
    assert sample_rows(conn, into, prefix) == expected
    assert result.replay.cut.position == position and result.replay.beyond_cut == 0
    assert result.schema == into and result.live == SAMPLES_SCHEMA
    assert result.rows["samples"] == digest(conn, SamplesView(), into).rows


def test_the_command_rebuilds_until_a_position_and_digest_reads_the_schema(
    store: EventStore, settings: Settings, conn: psycopg.Connection[Any],
) -> None:
    states = _history(store, random.Random(11), "c-", 30)
    position, expected = states[17]
    with ProjectionRunner(store.settings, SamplesView()) as live:
        live.catch_up()
    live_digest = digest(conn, SamplesView())

    done = evp(settings, "projections", "rebuild", "samples", "--position", str(position), "--into", "audit_c",
                         "--json")
    assert done.code == 0, done.err
    answer = json.loads(done.out)
    cut = _cut(store, position)
    assert answer["cut"] == cut.as_dict() and answer["cut"]["position"] == position
    assert (answer["schema"], answer["live"], answer["view"]) == ("audit_c", SAMPLES_SCHEMA, "samples")
    assert answer["rows"] == {"samples": len(expected)} and answer["replay"]["beyond_cut"] == 0
    assert sample_rows(conn, "audit_c") == expected
    assert digest(conn, SamplesView()) == live_digest, "the live view is untouched"

    done = evp(settings, "projections", "digest", "samples", "--schema", "audit_c", "--json")
    assert done.code == 0
    assert json.loads(done.out)["sha256"] == digest(conn, SamplesView(), "audit_c").sha256

    # a time maps to the last position recorded by then; the text answer names it and the ends
    then, expected_then = states[9]
    moment = recorded_at(store, then)
    done = evp(settings, "projections", "rebuild", "samples", "--until", moment.isoformat(), "--into", "audit_t")
    assert done.code == 0, done.err
    assert f"as of {moment.isoformat()}: ledger position {then} (topic ends" in done.out
    assert "into schema audit_t" in done.out and f"the live schema {SAMPLES_SCHEMA} untouched" in done.out
    assert "0 beyond the cut skipped" in done.out
    assert sample_rows(conn, "audit_t") == expected_then

    # --into alone: the view at the ledger's last position, equal to the live one
    done = evp(settings, "projections", "rebuild", "samples", "--into", "audit_now", "--json")
    assert done.code == 0, done.err
    assert json.loads(done.out)["cut"]["position"] == states[-1][0]
    assert digest(conn, SamplesView(), "audit_now").sha256 == live_digest.sha256


# -- a relay's re-send below an end ---------------------------------------------------------------
def test_a_later_record_below_an_end_is_skipped_and_counted(store: EventStore, settings: Settings,
                                                             conn: psycopg.Connection[Any]) -> None:
    stream = "sample-r1"
    first = store.append(stream, submitted("r1", "a1", 1, 3)).positions[0]
    second = store.append(stream, corrected("r1", "a1", 2, 1)).positions[0]
    store.append(stream, corrected("r1", "a1", 7, 2))  # after the cut, and before the re-send on the topic
    store.flush()
    resend(store, [first, second])  # the cut's end of this partition is now past the third event's record
    cut = _cut(store, second)
    for into, prefetch in (("past_inline", False), ("past_prefetched", True)):  # both sources filter alike
        result = rebuild_as_of(settings, SamplesView(), cut, into=into, prefetch=prefetch)
        assert result.replay.beyond_cut == 1 and result.replay.skipped == 2 and result.replay.applied == 2
        row = sample_rows(conn, into)["r1"]
        assert (row["label"], row["corrections"], row["version"]) == (2, 1, 2)


# -- refusals ---------------------------------------------------------------------------------
def test_a_past_view_never_lands_on_the_live_schema_or_on_tables(
    store: EventStore, settings: Settings, conn: psycopg.Connection[Any],
) -> None:
    states = _history(store, random.Random(3), "f-", 6)
    position = states[2][0]
    with ProjectionRunner(settings, SamplesView()) as live:
        live.catch_up()
    before = digest(conn, SamplesView())

    for option in (("--position", str(position)), ("--until", "2026-01-01T00:00:00+00:00")):
        done = evp(settings, "projections", "rebuild", "samples", *option)
        assert done.code == 1 and f"{option[0]} rebuilds the view as it was, and needs --into SCHEMA" in done.err
        assert "never replaces the live one" in done.err
    done = evp(settings, "projections", "rebuild", "samples", "--until", "yesterday", "--into", "x")
    assert done.code == 1 and "--until 'yesterday' is not an ISO 8601 time" in done.err

    cut = _cut(store, position)
    with pytest.raises(ConfigurationError, match=f"--into '{SAMPLES_SCHEMA}' is the live schema of the view"):
        rebuild_as_of(settings, SamplesView(), cut, into=SAMPLES_SCHEMA)
    with pytest.raises(ConfigurationError, match=f"--into '{SAMPLES_SCHEMA}_rebuild' is the shadow schema"):
        rebuild_as_of(settings, SamplesView(), cut, into=f"{SAMPLES_SCHEMA}_rebuild")
    with pytest.raises(ConfigurationError, match="--into 'mine' is the live schema"):
        rebuild_as_of(settings, SamplesView(), cut, into="mine", schema="mine")
    done = evp(settings, "projections", "rebuild", "samples", "--position", str(position), "--into", SAMPLES_SCHEMA)
    assert done.code == 1 and f"--into '{SAMPLES_SCHEMA}' is the live schema" in done.err

    conn.execute("CREATE SCHEMA busy")
    conn.execute("CREATE TABLE busy.notes (note text)")
    conn.execute("INSERT INTO busy.notes VALUES ('keep me')")
    done = evp(settings, "projections", "rebuild", "samples", "--position", str(position), "--into", "busy")
    assert done.code == 1 and "--into 'busy' already holds tables (notes)" in done.err
    assert conn.execute("SELECT note FROM busy.notes").fetchall() == [("keep me",)]
    assert [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'busy'")] == ["notes"]
    rebuild_as_of(settings, SamplesView(), cut, into="past_once")
    with pytest.raises(ConfigurationError, match="--into 'past_once' already holds tables"):
        rebuild_as_of(settings, SamplesView(), cut, into="past_once")  # a past view is never written over
    assert digest(conn, SamplesView()) == before, "the live view is untouched by every refusal"


def test_a_failed_replay_leaves_nothing_in_the_schema(store: EventStore, settings: Settings,
                                                      conn: psycopg.Connection[Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    states = _history(store, random.Random(5), "g-", 4)

    def broken(self: ProjectionRunner, cut: Cut, on_progress: object = None) -> None:
        raise ConnectionError("the broker went away")

    monkeypatch.setattr(ProjectionRunner, "catch_up_to", broken)
    with pytest.raises(ConnectionError):
        rebuild_as_of(settings, SamplesView(), _cut(store, states[-1][0]), into="past_failed")
    assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'past_failed'").fetchone() is None
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier("past_kept")))
    with pytest.raises(ConnectionError):
        rebuild_as_of(settings, SamplesView(), _cut(store, states[-1][0]), into="past_kept")
    assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'past_kept'").fetchone() == (0,)
    assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'past_kept'").fetchone() is not None
