"""`evp audit verify` finds altered, forged and missing events, and says so when all is intact."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from events.store.client import EventStore
from events.adapters.kafka import producer
from events.event import HEADER_EVENT_ID, HEADER_STREAM_VERSION, Event, kafka_headers
from events.ops.integrity import verify_log
from events.store.log import end_offsets, read_pinned
from tests.support.topics import recreate_events_topic
from events.settings import Settings
from tests.support.plaintext import kafka_segments

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
    assert sorted(f.kind for f in report.findings) == ["forged", "unchained"], report.findings
    assert all("partition" in f.detail for f in report.findings)
    assert str(forged) in next(f.detail for f in report.findings if f.kind == "forged")


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


def test_a_copy_with_another_version_header_is_named_not_passed_as_a_re_send(store: EventStore,
                                                                           settings: Settings) -> None:
    """Consumers dedupe on the version header: a copy that lies about it is a finding."""
    seed(store)
    original = store.read_stream("sample-4", decrypt=False)[0].record
    client = producer(settings)
    headers = [(k, v) for k, v in kafka_headers(original) if k != HEADER_STREAM_VERSION]
    client.send(settings.events_topic, key=b"sample-4", value=original.value,
                headers=[*headers, (HEADER_STREAM_VERSION, b"7")], partition=original.partition).get(timeout=30)
    client.close()
    report = verify_log(store)
    assert sorted(f.kind for f in report.findings) == ["altered", "unchained"], report.findings
    altered = next(f.detail for f in report.findings if f.kind == "altered")
    assert "sample-4 v1" in altered and "b'7'" in altered


def test_a_deleted_and_recreated_topic_is_truncated_not_intact(store: EventStore, settings: Settings) -> None:
    seed(store)
    published = store.ledger.connection.execute(
        "SELECT partition, count(*) FROM evp_event_log WHERE kafka_offset IS NOT NULL GROUP BY partition").fetchall()
    recreate_events_topic(settings)
    report = verify_log(store)
    assert report.records_read == 0 and not report.intact
    truncated = sorted(f.detail for f in report.findings if f.kind == "truncated")
    assert [f.kind for f in report.findings] == ["truncated"] * len(published)
    for (partition, count), detail in zip(sorted(published), truncated):
        assert detail.startswith(f"partition {partition} ends at offset 0") and f"recorded {count} published" in detail


def test_a_flipped_byte_in_a_segment_is_a_corrupt_range_and_the_check_goes_on(store: EventStore,
                                                                            settings: Settings) -> None:
    for i in range(30):
        store.append(f"sample-c{i}", Event("SampleSubmitted", {"sample_id": f"c{i}", "annotator_id": "a1",
                                                               "features": [float(i)] * 64, "label": i % 10}))
        store.flush()  # one record batch per event, so one flipped byte spoils one batch
    segments = [p for p in kafka_segments(settings) if p.parent.name.startswith(settings.events_topic + "-")
                and p.stat().st_size > 0]
    if not segments:
        pytest.fail("the broker's segments are not on this machine: the test needs the local broker")
    segment = max(segments, key=lambda p: p.stat().st_size)
    partition = int(segment.parent.name.rsplit("-", 1)[1])
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some record batch of the partition
    segment.write_bytes(bytes(data))
    report = verify_log(store)
    corrupt = [f for f in report.findings if f.kind == "corrupt"]
    assert len(corrupt) == 1 and corrupt[0].detail.startswith(f"partition {partition} offsets "), report.findings
    assert [f.kind for f in report.findings] == ["corrupt"], "nothing else: the events in the range are not 'missing'"
    assert report.records_read >= 29, "every other record was read and checked"


def test_a_relay_crash_between_ack_and_commit_re_sends_the_same_links(store: EventStore, settings: Settings,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka acknowledged, the ledger did not record it: the re-send repeats the links; verify calls it intact."""
    from events.store import relay as relay_module
    from events.store.chain import link_header
    from events.store.relay import Relay

    seed(store)
    for i in range(3):
        store.append(f"sample-r{i}", Event("SampleSubmitted", {"sample_id": f"r{i}", "annotator_id": "a1",
                                                               "features": [2.0] * 64, "label": i}))
    crashing = Relay(settings)
    monkeypatch.setattr(relay_module, "_MARK_PUBLISHED", "SELECT pg_terminate_backend(pg_backend_pid())")
    with pytest.raises(Exception):
        crashing.publish_pending()
    crashing.close()
    monkeypatch.undo()
    assert store.flush() == 3  # the same three events again, from the same heads
    records = [m for p, (start, end) in sorted({p: (0, e) for p, e in end_offsets(settings, settings.events_topic).items()}.items())
               for m in read_pinned(settings, settings.events_topic, {p: (start, end)})]
    by_event: dict[bytes, set[bytes | None]] = {}
    for m in records:
        by_event.setdefault(dict(m.headers)[HEADER_EVENT_ID], set()).add(link_header(m.headers))
    assert len(records) == 7 + 3 + 3 and all(len(found) == 1 for found in by_event.values())
    report = verify_log(store)
    assert report.intact, report.findings


def test_a_removed_record_breaks_its_partitions_chain_where_it_was(store: EventStore, settings: Settings) -> None:
    """The topic rebuilt from its own records, one left out: the chain says where."""
    for i in range(8):
        store.append("sample-x", Event("SampleSubmitted", {"sample_id": "x", "annotator_id": "a1",
                                                           "features": [float(i)] * 64, "label": i % 10}), i)
    store.flush()
    partition, end = next((p, e) for p, e in end_offsets(settings, settings.events_topic).items() if e)
    kept = [m for m in read_pinned(settings, settings.events_topic, {partition: (0, end)}) if m.offset != 3]
    recreate_events_topic(settings)
    kafka = producer(settings)
    for m in kept:
        kafka.send(settings.events_topic, key=m.key, value=m.value, headers=list(m.headers), partition=partition)
    kafka.flush()
    kafka.close()
    report = verify_log(store)
    broken = [f for f in report.findings if f.kind == "chain"]
    assert [f.detail.split(":")[0] for f in broken] == [f"partition {partition} offset 3"], report.findings
