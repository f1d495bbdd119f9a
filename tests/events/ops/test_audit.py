"""Audit queries list who did what, in order, from the ledger; the CLI prints the same as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from events.ops.audit import stream_history, subject_history
from events.store.client import EventStore
from events.errors import NotFound
from events.event import NO_STREAM, Event
from events.settings import Settings

pytestmark = pytest.mark.services


def seed(store: EventStore) -> None:
    store.append("annotator-a1", Event("AnnotatorRegistered", {"annotator_id": "a1", "name": "Xavier Quint",
                                                                "email": "xq@example.org"}, actor="a1"), NO_STREAM)
    for i in range(3):
        store.append(f"sample-{i}", Event("SampleSubmitted", {"sample_id": f"s{i}", "annotator_id": "a1",
                                                               "features": [0.0] * 64, "label": i}, actor="a1"))
    store.append("sample-1", Event("LabelCorrected", {"sample_id": "s1", "annotator_id": "b2", "previous_label": 1,
                                                      "label": 7}, actor="b2"), 1)
    store.append("sample-1", Event("SampleRetracted", {"sample_id": "s1", "annotator_id": "a1", "reason": "dup"},
                                   actor="a1"), 2)
    store.flush()


def test_stream_history_is_in_version_order_with_actors(store: EventStore) -> None:
    seed(store)
    entries = stream_history(store, "sample-1")
    assert [(e.version, e.event_type, e.actor) for e in entries] == [
        (1, "SampleSubmitted", "a1"), (2, "LabelCorrected", "b2"), (3, "SampleRetracted", "a1")]
    assert all(e.kafka.split("@")[1].isdigit() for e in entries)  # published: partition@offset


def test_subject_history_covers_what_the_subject_holds_and_did_in_log_order(store: EventStore) -> None:
    seed(store)
    entries = subject_history(store, "a1")
    positions = [e.position for e in entries]
    assert positions == sorted(positions)
    assert [e.event_type for e in entries].count("SampleSubmitted") == 3
    assert entries[0].event_type == "AnnotatorRegistered"
    assert entries[0].data["name"].startswith("evp1:")  # not decrypted unless asked
    assert subject_history(store, "a1", decrypt=True)[0].data["name"] == "Xavier Quint"
    assert {e.stream_id for e in subject_history(store, "b2")} == {"sample-1"}


def test_cli_prints_json_for_scripts(store: EventStore, settings: Settings) -> None:
    seed(store)
    result = subprocess.run([sys.executable, "-m", "events.cli", "audit", "stream", "sample-1", "--json"],
                            capture_output=True, text=True, env={**settings.to_env(), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [e["version"] for e in json.loads(result.stdout)] == [1, 2, 3]
    missing = subprocess.run([sys.executable, "-m", "events.cli", "audit", "stream", "nope"],
                             capture_output=True, text=True, env={**settings.to_env(), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert missing.returncode == 1 and "'nope' does not exist" in missing.stderr


def test_audit_reads_are_recorded_as_events(store: EventStore) -> None:
    seed(store)
    subject_history(store, "a1", decrypt=True)
    stream_history(store, "sample-1")
    reads = [e.data for e in store.read_stream("audit-reads-subject")] + [e.data for e in store.read_stream("audit-reads-stream")]
    assert [(r["query"], r["target"], r["decrypted"]) for r in reads] == [("subject", "a1", True), ("stream", "sample-1", False)]
    assert reads[0]["results"] == 5 and reads[1]["results"] == 3
    # the next subject query shows that a1's history was read
    assert "AuditQueried" in [e.event_type for e in subject_history(store, "a1")]


def test_a_stream_reads_as_it_was_at_a_position_or_a_time(store: EventStore, settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    seed(store)
    second = store.read_stream("sample-1", decrypt=False)[1].record
    assert [e.version for e in stream_history(store, "sample-1", position=second.position)] == [1, 2]
    assert [e.version for e in stream_history(store, "sample-1", as_of=second.recorded_at)] == [1, 2]
    with pytest.raises(NotFound, match="had no event yet"):
        stream_history(store, "sample-1", position=1)  # position 1 is the annotator's registration

    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    shown = subprocess.run([sys.executable, "-m", "events.cli", "streams", "show", "sample-1", "--as-of",
                            second.recorded_at.isoformat(), "--json"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert (printed["version"], printed["as_of_position"]) == (2, second.position)
    assert [e["version"] for e in printed["events"]] == [1, 2]
    bad = subprocess.run([sys.executable, "-m", "events.cli", "streams", "show", "sample-1", "--as-of", "yesterday"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "ISO 8601" in bad.stderr
