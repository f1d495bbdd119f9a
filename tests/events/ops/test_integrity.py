"""`evp audit verify` finds altered, forged and missing events, and says so when all is intact.

Each tamper test names the finding's kind and where it is (partition and offset, event id or
stream and version), shows that the check went on past it, and runs the command too
(:func:`tests.support.cli.verified`: the same findings, exit status 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from events.store.client import EventStore
from events.adapters.kafka import producer
from events.event import HEADER_EVENT_ID, HEADER_STREAM_VERSION, Event, kafka_headers
from events.ops.integrity import Finding, verify_log
from events.store.log import end_offsets, read_pinned
from tests.support.cli import verified
from tests.support.topics import (
    events_segments, record_batches, recreate_events_topic, republish, segment_partition, spoil, topic_records,
)
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


def located(findings: list[Finding]) -> list[tuple[str, str]]:
    """Each finding's kind and the place it names first (``partition P offset O``, up to its colon)."""
    return [(f.kind, f.detail.split(":")[0]) for f in findings]


def submit_each(store: EventStore, count: int, tag: str) -> None:
    """``count`` events, each published on its own: one record batch per event."""
    for i in range(count):
        store.append(f"sample-{tag}{i}", Event("SampleSubmitted", {"sample_id": f"{tag}{i}", "annotator_id": "a1",
                                                                    "features": [float(i)] * 64, "label": i % 10}))
        store.flush()


def test_an_untouched_log_is_intact_even_with_relay_re_sends(store: EventStore) -> None:
    seed(store)
    store.ledger.connection.execute("INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events")
    assert store.flush() == 7  # every event now twice on the topic
    report = verified(store)
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
    sent = client.send(settings.events_topic, key=b"sample-4", value=original.value,
                       headers=[*headers, (HEADER_STREAM_VERSION, b"7")], partition=original.partition).get(timeout=30)
    client.close()
    store.append("sample-4", Event("SampleRetracted", {"sample_id": "s4", "annotator_id": "a1", "reason": "r"}), 1)
    store.flush()  # published after the copy: still read, and its chain still follows the relay's
    report = verified(store)
    where = f"partition {original.partition} offset {sent.offset}"
    assert located(report.findings) == [("unchained", where), ("altered", where)], report.findings
    assert report.findings[1].detail == (f"{where}: event {original.event_id} (sample-4 v1) carries evp.stream_version "
                                         "header b'7', the ledger records '1'")
    assert (report.records_read, report.events_checked) == (9, 8)


def test_a_deleted_and_recreated_topic_is_truncated_not_intact(store: EventStore, settings: Settings) -> None:
    seed(store)
    published = store.ledger.connection.execute(
        "SELECT partition, count(*) FROM evp_event_log WHERE kafka_offset IS NOT NULL GROUP BY partition").fetchall()
    recreate_events_topic(settings)
    report = verified(store)
    assert report.records_read == 0 and not report.intact
    truncated = sorted(f.detail for f in report.findings if f.kind == "truncated")
    assert [f.kind for f in report.findings] == ["truncated"] * len(published)
    for (partition, count), detail in zip(sorted(published), truncated):
        assert detail.startswith(f"partition {partition} ends at offset 0") and f"recorded {count} published" in detail

    # The relay goes on publishing into the new topic, chained on from the heads it recorded:
    # those records are read and checked; the events the ledger placed where they now sit are missing.
    for i in range(6):
        store.append(f"sample-n{i}", Event("SampleSubmitted", {"sample_id": f"n{i}", "annotator_id": "a1",
                                                                "features": [3.0] * 64, "label": i}))
    store.flush()
    ends = end_offsets(settings, settings.events_topic)
    old = store.ledger.connection.execute(
        "SELECT event_id, partition, kafka_offset FROM evp_event_log WHERE stream_id NOT LIKE 'sample-n%'").fetchall()
    report = verified(store)
    assert report.records_read == 6
    found = {kind: sorted(f.detail for f in report.findings if f.kind == kind)
             for kind in ("chain", "missing", "truncated")}
    assert sum(map(len, found.values())) == len(report.findings), report.findings
    assert [d.split(":")[0] for d in found["chain"]] == [
        f"partition {p} offset 0" for p, end in sorted(ends.items()) if end]
    assert sorted(d.split(" was published at ")[1].split(" ")[0] for d in found["missing"]) == sorted(
        f"{p}@{offset}" for _, p, offset in old if offset < ends[p])
    assert {d.split(" ")[1] for d in found["missing"]} == {str(e) for e, p, offset in old if offset < ends[p]}
    assert [d.split(" ends")[0] for d in found["truncated"]] == [
        f"partition {p}" for p in sorted({p for _, p, offset in old if offset >= ends[p]})]


def test_a_flipped_byte_in_a_segment_is_a_corrupt_range_and_the_check_goes_on(store: EventStore,
                                                                            settings: Settings) -> None:
    submit_each(store, 30, "c")  # one record batch per event, so one flipped byte spoils one batch
    segment = max(events_segments(settings), key=lambda p: p.stat().st_size)
    partition = segment_partition(segment)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some record batch of the partition
    segment.write_bytes(bytes(data))
    report = verify_log(store)
    corrupt = [f for f in report.findings if f.kind == "corrupt"]
    assert len(corrupt) == 1 and corrupt[0].detail.startswith(f"partition {partition} offsets "), report.findings
    assert [f.kind for f in report.findings] == ["corrupt"], "nothing else: the events in the range are not 'missing'"
    assert report.records_read >= 29, "every other record was read and checked"


def test_every_byte_flipped_in_a_sample_of_records_is_each_a_corrupt_range(store: EventStore,
                                                                           settings: Settings) -> None:
    """Every third record of one partition spoiled where the broker keeps it, the first one included:
    each is named with its offset, and every other record is read and checked."""
    submit_each(store, 30, "s")
    segment = max(events_segments(settings), key=lambda p: p.stat().st_size)
    partition = segment_partition(segment)
    batches = record_batches(segment)
    assert len(batches) >= 6 and all(b.first_offset == b.last_offset for b in batches), batches
    sample = batches[::3]
    for batch in sample:
        spoil(batch)
    report = verified(store)
    assert located(report.findings) == [("corrupt", f"partition {partition} offsets {b.first_offset}..{b.last_offset}")
                                        for b in sample], report.findings
    assert report.records_read == 30 - len(sample)


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
    [(partition, records)] = topic_records(settings).items()
    republish(settings, {partition: [m for m in records if m.offset != 3]})
    report = verified(store)
    removed = store.read_stream("sample-x", decrypt=False)[3].record
    assert located(report.findings) == [("chain", f"partition {partition} offset 3"),
                                        ("missing", f"event {removed.event_id} (sample-x v4) was published at "
                                                    f"{partition}@3 but is not on the topic intact")], report.findings
    assert report.records_read == 7


def test_two_records_swapped_on_the_topic_break_the_chain_where_each_moved(store: EventStore,
                                                                          settings: Settings) -> None:
    for i in range(8):
        store.append("sample-o", Event("SampleSubmitted", {"sample_id": "o", "annotator_id": "a1",
                                                           "features": [float(i)] * 64, "label": i % 10}), i)
    store.flush()
    [(partition, records)] = topic_records(settings).items()
    republish(settings, {partition: [*records[:2], records[5], *records[3:5], records[2], *records[6:]]})
    report = verified(store)
    # The record now at 2 does not follow 1, nor 3 the record moved away; and likewise at 5 and 6.
    assert located(report.findings) == [("chain", f"partition {partition} offset {o}") for o in (2, 3, 5, 6)]
    assert report.records_read == 8


def test_two_events_swapped_in_the_ledger_are_each_altered(store: EventStore) -> None:
    """Their bytes, streams and links stay as they were: the records' headers tell.

    Swapped ledger positions (the global order a cut and time travel read) and swapped stream versions."""
    seed(store)
    conn = store.ledger.connection
    first, second = (store.read_stream(s, decrypt=False)[0].record for s in ("sample-1", "sample-2"))
    for table in ("evp_events", "evp_published"):
        conn.execute(f"UPDATE {table} SET position = -1 WHERE position = %s", (first.position,))
        conn.execute(f"UPDATE {table} SET position = %s WHERE position = %s", (first.position, second.position))
        conn.execute(f"UPDATE {table} SET position = %s WHERE position = -1", (second.position,))
    submitted, corrected = (e.record for e in store.read_stream("sample-0", decrypt=False))
    conn.execute("UPDATE evp_events SET version = 3 WHERE event_id = %s", (submitted.event_id,))
    conn.execute("UPDATE evp_events SET version = 1 WHERE event_id = %s", (corrected.event_id,))
    conn.execute("UPDATE evp_events SET version = 2 WHERE event_id = %s", (submitted.event_id,))
    report = verified(store)
    expected = [
        (first, f"event {first.event_id} (sample-1 v1) carries evp.position header b'{first.position}', the ledger "
                f"records '{second.position}'"),
        (second, f"event {second.event_id} (sample-2 v1) carries evp.position header b'{second.position}', the ledger "
                 f"records '{first.position}'"),
        (submitted, f"event {submitted.event_id} (sample-0 v2) carries evp.stream_version header b'1', the ledger records '2'"),
        (corrected, f"event {corrected.event_id} (sample-0 v1) carries evp.stream_version header b'2', the ledger records '1'"),
    ]
    assert sorted((f.kind, f.detail) for f in report.findings) == sorted(
        ("altered", f"partition {r.partition} offset {r.offset}: {detail}") for r, detail in expected)
    assert report.records_read == 7


def test_who_did_it_and_when_edited_in_the_ledger_alone_are_altered(store: EventStore) -> None:
    """The audit trail reads the ledger: an actor, a type or a time changed there is a finding."""
    seed(store)
    conn = store.ledger.connection
    actor, when = (store.read_stream(s, decrypt=False)[0].record for s in ("sample-1", "sample-2"))
    conn.execute("UPDATE evp_events SET actor = 'someone-else' WHERE event_id = %s", (actor.event_id,))
    conn.execute("UPDATE evp_events SET occurred_at = occurred_at - interval '1 day' WHERE event_id = %s",
                 (when.event_id,))
    conn.execute("SET TIME ZONE 'Asia/Kathmandu'")  # the same instants read in another zone are no finding
    report = verified(store)
    details = sorted(f.detail for f in report.findings)
    assert [f.kind for f in report.findings] == ["altered", "altered"], details
    assert any(f"event {actor.event_id}" in d and f"evp.actor header b'{actor.actor}', the ledger records "
               "'someone-else'" in d for d in details), details
    assert any(f"event {when.event_id}" in d and "evp.occurred_at header" in d for d in details), details
