"""`evp audit verify` finds altered, forged and missing events, and says so when all is intact."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from events.store.client import EventStore
from events.event import HEADER_EVENT_ID, Event
from events.ops.integrity import verify_log
from events.adapters.kafka import producer
from events.settings import Settings

pytestmark = pytest.mark.services


def seed(store: EventStore) -> None:
    for i in range(6):
        store.append(f"sample-{i}", Event("SampleSubmitted", {"sample_id": f"s{i}", "annotator_id": "a1",
                                                               "features": [1.0] * 64, "label": i}))
    store.append("sample-0", Event("LabelCorrected", {"sample_id": "s0", "annotator_id": "a2", "previous_label": 0,
                                                      "label": 5}), 1)
    store.flush()


def kinds(store: EventStore) -> list[str]:
    return sorted(f.kind for f in verify_log(store).findings)


def test_an_untouched_log_is_intact_even_with_relay_re_sends(store: EventStore) -> None:
    seed(store)
    store.ledger.connection.execute("INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events")
    assert store.flush() == 7  # every event now twice on the topic
    report = verify_log(store)
    assert report.intact, report.findings
    assert (report.events_checked, report.records_read) == (7, 14)


def test_an_altered_ledger_row_is_named(store: EventStore) -> None:
    seed(store)
    row = store.ledger.connection.execute(
        "UPDATE evp_events SET value = value || '\\x00'::bytea WHERE stream_id = 'sample-3' RETURNING event_id"
    ).fetchone()
    report = verify_log(store)
    assert [f.kind for f in report.findings] == ["altered"]
    assert str(row[0]) in report.findings[0].detail and "sample-3 v1" in report.findings[0].detail  # type: ignore[index]


def test_a_forged_record_on_the_topic_is_named(store: EventStore, settings: Settings) -> None:
    seed(store)
    forged = uuid.uuid4()
    value = store.read_stream("sample-1", decrypt=False)[0].record.value
    client = producer(settings)
    client.send(settings.events_topic, key=b"sample-1", value=value, headers=[(HEADER_EVENT_ID, str(forged).encode())])
    client.flush()
    client.close()
    report = verify_log(store)
    assert [f.kind for f in report.findings] == ["forged"] and str(forged) in report.findings[0].detail


def test_a_deleted_ledger_row_shows_as_a_gap_and_an_unknown_record(store: EventStore) -> None:
    seed(store)
    store.ledger.connection.execute("DELETE FROM evp_events WHERE stream_id = 'sample-0' AND version = 1")
    assert kinds(store) == ["forged", "gap"]


def test_cli_exit_code_follows_the_verdict(store: EventStore, settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    seed(store)
    command = [sys.executable, "-m", "events.cli", "audit", "verify", "--json"]
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    intact = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert intact.returncode == 0 and json.loads(intact.stdout)["intact"] is True
    store.ledger.connection.execute("UPDATE evp_events SET value = value || '\\x01'::bytea WHERE stream_id = 'sample-2'")
    tampered = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert tampered.returncode == 1 and [f["kind"] for f in json.loads(tampered.stdout)["findings"]] == ["altered"]
