"""Backups of the event log: round trip through a file into fresh services, integrity, refusal, erasure.

One source is seeded once for the module — annotators with personal data, samples,
corrections, a retraction, relay duplicates and a snapshot — backed up once, and restored
once under a new topic prefix into a new database; each test then checks one promise
against that pair, and none writes to it, so they pass in any order. A test that writes to
a restored copy restores its own (``restored_copy``); the erasure test seeds its own
source, because it forgets someone.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from contextlib import closing, contextmanager
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import fastavro
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from events.adapters.storage import Storage
from events.ops.backup import (
    MANIFEST_KEY,
    RECORD_SCHEMA,
    BackupFile,
    BackupKey,
    BackupRecord,
    Manifest,
    Tally,
    verify_file,
)
from events.ops.backup_set import create_backup
from events.ops.restore import RestoreReport, copy_keys, restore_backup, retarget_schema_record
from events.store.client import EventStore
from events.errors import ConcurrencyError, ConfigurationError, EvpError, IntegrityError
from events.event import Event
from events.ops.forget import forget_subject
from events.privacy.keyring import MemoryKeyStore, PostgresKeyStore
from events.store.log import end_offsets
from events.privacy.personal import REDACTED
from events.settings import Settings
from tests.conftest import delete_topics, new_topic_prefix, private_settings
from tests.support.examples import DIGITS, project
from tests.support.plaintext import Person, PlaintextScanner, make_people, random_marker, register, run_cli, submit

pytestmark = pytest.mark.services

SAMPLES_EACH = 4


@dataclass(frozen=True)
class Source:
    settings: Settings
    people: tuple[Person, ...]
    marker: str  #: non-personal, travels in every SampleSubmitted: the scanner's control
    resent: int  #: events the relay published twice
    snapshot_id: str
    backup: Path  #: the backup set (a folder)
    file: Path  #: its one (full) backup
    samples: dict[Any, Any]  #: the samples view, projected from the source after the backup

    @property
    def key(self) -> BackupKey:
        return BackupKey.from_settings(self.settings)


def samples_view(settings: Settings) -> dict[Any, Any]:
    """Project the digits samples view from the settings' topic and read it back."""
    from projections.runner import ProjectionRunner
    from projections.tables import read_rows

    view = project(DIGITS).load("views", "samples")()
    with ProjectionRunner(settings, view) as runner:
        runner.catch_up()
    with psycopg.connect(settings.database_url) as conn, conn.cursor() as cur:
        return read_rows(cur, view)


def seed_people(store: EventStore, people: tuple[Person, ...], marker: str) -> None:
    for person in people:
        register(store, person)
        submit(store, person, [f"{person.annotator_id}-s{i}" for i in range(SAMPLES_EACH)], marker)
    store.flush()


def resend(store: EventStore, where: str) -> int:
    """Put published events back in the outbox and publish them again: what a relay crash causes."""
    with store.ledger.connection.transaction():
        count = store.ledger.connection.execute(
            f"INSERT INTO evp_outbox (position, partition) SELECT position, partition FROM evp_events WHERE {where}"
        ).rowcount
    store.flush()
    return count


def open_file(path: Path) -> BackupFile:
    return BackupFile(Storage(path.parent), path.name)


def verify_backup(path: Path, key: BackupKey | None) -> Manifest:
    """One backup file verified on its own (the set's checks are in test_backup_set.py)."""
    return verify_file(Storage(path.parent), path.name, key)


def backup_file(settings: Settings, folder: Path) -> Path:
    """A new full backup in ``folder``; its file."""
    return folder / create_backup(settings, folder).name


def record_bytes(path: Path) -> bytes:
    """Every key, value and header of a backup, decompressed: what a reader of the file can see."""
    with open_file(path) as backup:
        return b"\n".join(
            part for r in backup.records()
            for part in (r.key or b"", r.value or b"", *(k.encode() + (v or b"") for k, v in r.headers))
        )


@pytest.fixture(scope="module")
def source(services: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    from trainer.snapshot import create_snapshot, load_dataset

    folder = tmp_path_factory.mktemp("backup-source")
    rng = random.Random()
    people = tuple(make_people(rng, 3))
    marker = random_marker(rng, "backup")
    with private_settings(services, folder / "home", kek_file=folder / "kek") as settings:
        with EventStore.open(settings) as store:
            seed_people(store, people, marker)
            first = people[0].annotator_id
            store.append(f"sample-{first}-s0", Event("LabelCorrected", {
                "sample_id": f"{first}-s0", "annotator_id": people[1].annotator_id, "previous_label": 0, "label": 7,
            }), expected_version=1)
            store.append(f"sample-{first}-s1", Event("SampleRetracted", {
                "sample_id": f"{first}-s1", "annotator_id": first, "reason": "blurred",
            }), expected_version=1)
            store.flush()
            resent = resend(store, "stream_id LIKE 'annotator-%' OR version = 2")
            snapshot_id = create_snapshot(store, load_dataset(project(DIGITS), "digits")).snapshot_id
        backup = folder / "backups"
        file = backup_file(settings, backup)
        yield Source(settings, people, marker, resent, snapshot_id, backup, file, samples_view(settings))


@contextmanager
def restore_into_new(services: Settings, source: Source, home: Path) -> Iterator[tuple[Settings, RestoreReport]]:
    """The backup restored under a new prefix, into a new database, with the source's keys copied."""
    with private_settings(services, home, kek_file=source.settings.kek_path) as target, \
            closing(PostgresKeyStore(source.settings.database_url)) as keys:
        yield target, restore_backup(source.backup, target, keys=keys)


@pytest.fixture(scope="module")
def restored(services: Settings, source: Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, RestoreReport]]:
    """One restore shared by the module's tests: read it, never write to it (``restored_copy`` is for writing)."""
    with restore_into_new(services, source, tmp_path_factory.mktemp("backup-target") / "home") as restored:
        yield restored


@pytest.fixture
def restored_copy(services: Settings, source: Source, tmp_path: Path) -> Iterator[tuple[Settings, RestoreReport]]:
    """A restore of the module's backup for one test, which may append to it and project from it.

    The snapshot shards are copied along, as an operator restores the shard store with the log.
    """
    with restore_into_new(services, source, tmp_path / "home") as (target, report):
        shutil.copytree(source.settings.snapshots_dir, target.snapshots_dir)
        yield target, report


def stream_ids(settings: Settings) -> list[str]:
    with psycopg.connect(settings.database_url) as conn:
        return [r[0] for r in conn.execute("SELECT stream_id FROM evp_streams ORDER BY stream_id")]


def manifest_of(path: Path) -> Manifest:
    with open_file(path) as backup:
        return backup.manifest


def first_offsets(path: Path) -> dict[uuid.UUID, tuple[int, int]]:
    """Where each event id first appears in a backup (offsets are preserved by the restore)."""
    found: dict[uuid.UUID, tuple[int, int]] = {}
    with open_file(path) as backup:
        for r in backup.records():
            headers = dict(r.headers)
            if r.source == "EVENTS":
                found.setdefault(uuid.UUID((headers["evp.event_id"] or b"").decode()), (r.partition, r.offset))
    return found


def ledger_subjects(settings: Settings) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute("SELECT event_id, subject_id, actor FROM evp_events ORDER BY event_id").fetchall()


def ledger_state(settings: Settings) -> tuple[Any, ...]:
    with psycopg.connect(settings.database_url) as conn:
        return (conn.execute("SELECT count(*), max(position) FROM evp_events").fetchone(),
                conn.execute("SELECT count(*) FROM evp_outbox").fetchone())


# -- the round trip ------------------------------------------------------------------------
def test_every_stream_comes_back_with_the_same_events_and_personal_data(source: Source, restored: tuple[Settings, RestoreReport]) -> None:
    target, report = restored
    assert verify_backup(source.file, source.key) == manifest_of(source.file)
    streams = stream_ids(source.settings)
    first_copies = first_offsets(source.file)
    assert stream_ids(target) == streams and len(streams) >= 3 * (1 + SAMPLES_EACH) + 1
    with EventStore.open(source.settings) as before, EventStore.open(target) as after:
        for stream in streams:
            old, new = before.read_stream(stream), after.read_stream(stream)
            assert [(e.record.event_id, e.record.version, e.type, e.record.actor, e.record.occurred_at, e.data)
                    for e in new] == [(e.record.event_id, e.record.version, e.type, e.record.actor,
                                       e.record.occurred_at, e.data) for e in old], stream
            # positions come from the records' headers; a re-sent event's offset is its first copy's
            assert [e.record.position for e in new] == [e.record.position for e in old], stream
            assert [(e.record.partition, e.record.offset) for e in new] == \
                   [first_copies[e.record.event_id] for e in old], stream
        for person in source.people:
            data = after.read_stream(person.stream_id)[0].data
            assert (data["name"], data["email"]) == (person.name, person.email)
    # subject ids are derived again from the catalog's subject field: erasure and audit scopes agree
    assert ledger_subjects(target) == ledger_subjects(source.settings)
    assert report.offsets_preserved and report.foreign == 0 and not report.incomplete_streams
    assert report.streams == len(streams)
    assert end_offsets(target, target.events_topic) == end_offsets(source.settings, source.settings.events_topic)
    assert ledger_state(target)[1] == (0,)  # nothing waits in the restored outbox


def test_relay_duplicates_stay_on_the_topic_but_enter_the_ledger_once(source: Source, restored: tuple[Settings, RestoreReport]) -> None:
    target, report = restored
    source_events = ledger_state(source.settings)[0][0]
    assert source.resent > 0
    assert report.duplicates == source.resent
    assert report.records == source_events + source.resent == manifest_of(source.file).records
    assert report.ledger_events == source_events == ledger_state(target)[0][0]


def test_the_restored_copy_serves_snapshots_views_audits_and_new_appends(
        source: Source, restored_copy: tuple[Settings, RestoreReport]) -> None:
    from events.ops.audit import subject_history
    from trainer.snapshot import verify_snapshot

    target, _ = restored_copy
    assert samples_view(target) == source.samples and len(source.samples) == 3 * SAMPLES_EACH - 1
    with EventStore.open(target) as store:
        # the snapshot's pinned offsets still name the same records on the restored topic
        assert verify_snapshot(store, source.snapshot_id, project(DIGITS)).records_read > 0
        person = source.people[2]
        history = subject_history(store, person.annotator_id, decrypt=True)
        assert history[0].data["email"] == person.email
        version = store.ledger.version(person.stream_id)
        assert version == 1
        with pytest.raises(ConcurrencyError):
            store.append(person.stream_id, Event("SampleRetracted", {
                "sample_id": "x", "annotator_id": person.annotator_id, "reason": "stale"}), expected_version=0)
        sample_version = store.ledger.version(f"sample-{person.annotator_id}-s0")
        assert sample_version == 1
        appended = store.append(f"sample-{person.annotator_id}-s0", Event("LabelCorrected", {
            "sample_id": f"{person.annotator_id}-s0", "annotator_id": person.annotator_id, "previous_label": 1,
            "label": 2}), expected_version=sample_version)
        assert appended.first_version == 2
        store.flush()
        newest = store.ledger.read_stream(f"sample-{person.annotator_id}-s0")[-1]
        assert newest.offset is not None and newest.position > ledger_state(source.settings)[0][1]
    # the registry's subjects moved with the topic, so the new append reused the restored schema id
    with psycopg.connect(source.settings.database_url) as conn:
        ids = conn.execute("SELECT DISTINCT schema_id FROM evp_events WHERE event_type = %s", (newest.event_type,)).fetchall()
    assert ids == [(newest.schema_id,)]


# -- integrity -----------------------------------------------------------------------------
def header_end(data: bytes) -> int:
    """Where a container's records begin: its header ends with the sync marker every block ends with."""
    sync = data[-16:]
    return data.index(sync) + len(sync)


def test_a_byte_flipped_anywhere_in_the_records_fails_verification(source: Source, tmp_path_factory: pytest.TempPathFactory) -> None:
    data = source.file.read_bytes()
    start = header_end(data)
    tampered = tmp_path_factory.mktemp("tampered") / "flipped.evpbak"

    with open_file(source.file) as original:
        records = [r.canonical_bytes() for r in original.records()]

    @hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(start, len(data) - 1))
    def flipped(at: int) -> None:
        tampered.write_bytes(data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:])
        for key in (source.key, None):  # None: the self-check alone finds corruption too
            try:
                verify_backup(tampered, key)
            except IntegrityError as err:
                assert str(tampered) in str(err)
                continue
            # Not refused: then the flip hit bits the deflate stream ignores (the padding
            # after its final block), and every record reads exactly as it was written.
            with open_file(tampered) as read:
                assert [r.canonical_bytes() for r in read.records()] == records, f"flip at {at} went unnoticed"

    flipped()


def test_truncated_and_re_encoded_backups_fail_verification_naming_what_differs(source: Source, tmp_path: Path) -> None:
    data = source.file.read_bytes()
    truncated = tmp_path / "truncated.evpbak"
    for cut in (len(data) - 1, len(data) // 2, header_end(data)):
        truncated.write_bytes(data[:cut])
        with pytest.raises(IntegrityError):
            verify_backup(truncated, source.key)

    # A forger who re-encodes the records validly but keeps the manifest is caught by the hash…
    with open_file(source.file) as backup:
        manifest, records = backup.manifest, list(backup.records())
    last = next(r for r in reversed(records) if r.source == "EVENTS")
    value = last.value or b"\x00"
    changed = BackupRecord(last.source, last.partition, last.offset, last.timestamp, last.key,
                           value[:-1] + bytes([value[-1] ^ 1]), last.headers)

    def forge(name: str, body: list[BackupRecord]) -> Path:
        path = tmp_path / name
        with path.open("wb") as out:
            fastavro.writer(out, fastavro.parse_schema(RECORD_SCHEMA),
                            [r.to_avro() for r in body], codec="deflate", metadata={MANIFEST_KEY: manifest.to_json()})
        return path

    at = records.index(last)
    with pytest.raises(IntegrityError, match="sha256"):
        verify_backup(forge("changed.evpbak", records[:at] + [changed] + records[at + 1:]), source.key)
    # …and one who drops a record by the counts.
    with pytest.raises(IntegrityError, match=f"partition {last.partition} has"):
        verify_backup(forge("dropped.evpbak", records[:at] + records[at + 1:]), source.key)
    with pytest.raises(IntegrityError, match="out of order"):
        verify_backup(forge("reordered.evpbak", [last] + records[:at] + records[at + 1:]), source.key)


def rehashed(manifest: Manifest, records: list[BackupRecord]) -> Manifest:
    """The manifest a forger writes for edited records: counts and sha256 recomputed, without the KEK."""
    tally = Tally(manifest.ranges, manifest.schema_range)
    for record in records:
        tally.add(record)
    return replace(manifest, counts=dict(tally.counts), schema_records=tally.schema_records, sha256=tally.sha256(),
                   state=dict(tally.state), chain_heads=dict(tally.heads))


def test_an_edited_and_re_hashed_backup_fails_authentication(source: Source, tmp_path: Path) -> None:
    with open_file(source.file) as backup:
        manifest, records = backup.manifest, list(backup.records())
    assert manifest.mac is not None and manifest.mac_key_id == source.key.key_id
    at, last = next((i, r) for i, r in reversed(list(enumerate(records))) if r.source == "EVENTS")
    value = last.value or b"\x00"
    edited = records[:at] + [BackupRecord(last.source, last.partition, last.offset, last.timestamp, last.key,
                                          value[:-1] + bytes([value[-1] ^ 1]), last.headers)] + records[at + 1:]

    def write(name: str, body: list[BackupRecord], forged: Manifest) -> Path:
        path = tmp_path / name
        with path.open("wb") as out:
            fastavro.writer(out, fastavro.parse_schema(RECORD_SCHEMA), [r.to_avro() for r in body],
                            codec="deflate", metadata={MANIFEST_KEY: forged.to_json()})
        return path

    # Edited, counts and sha256 recomputed: the self-check passes, the MAC does not.
    forged = rehashed(manifest, edited)
    path = write("rehashed.evpbak", edited, forged)
    assert verify_backup(path, None).sha256 == forged.sha256 != manifest.sha256
    with pytest.raises(IntegrityError, match=rf"backup {re.escape(str(path))} fails authentication.*edited"):
        verify_backup(path, source.key)
    # A record dropped and the counts fixed: the same.
    without = records[:at] + records[at + 1:]
    dropped = rehashed(manifest, without)
    with pytest.raises(IntegrityError, match="fails authentication"):
        verify_backup(write("dropped.evpbak", without, dropped), source.key)
    # Re-MACed under the forger's own key, claiming the right key id: still refused.
    own = BackupKey.generate()
    claimed = replace(forged, mac=own.mac(forged))
    with pytest.raises(IntegrityError, match="fails authentication"):
        verify_backup(write("own-key.evpbak", edited, claimed), source.key)
    # …and under its own key id: named as another key, not verified either.
    theirs = replace(forged, mac_key_id=own.key_id)
    theirs = replace(theirs, mac=own.mac(theirs))
    with pytest.raises(IntegrityError, match=rf"authenticated under backup key {own.key_id}.*{source.key.key_id}"):
        verify_backup(write("their-key.evpbak", edited, theirs), source.key)
    # The original still verifies; the MAC is not derivable from what the file shows.
    assert verify_backup(source.file, source.key) == manifest
    assert source.key.mac(manifest) == manifest.mac
    key_file = source.settings.kek_path.parent / "backup.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text().strip() not in source.file.read_bytes().decode("latin-1")
    assert "key_id" in repr(source.key) and manifest.mac not in repr(source.key)


def test_verifying_needs_the_backup_key_and_says_so(source: Source, tmp_path: Path) -> None:
    keyless = source.settings.with_(home=tmp_path / "elsewhere", kek_file=tmp_path / "elsewhere" / "kek", kek=None)
    with pytest.raises(ConfigurationError, match=r"needs the backup key.*backup.key does not exist"):
        BackupKey.from_settings(keyless)
    assert not (tmp_path / "elsewhere").exists()  # verifying never creates a key
    with pytest.raises(ConfigurationError, match="needs the backup key"):
        restore_backup(source.backup, keyless)
    refused = run_cli(keyless, "backup", "verify", str(source.backup))
    assert refused.returncode == 1 and "needs the backup key" in refused.stderr, refused.stderr
    unauthenticated = run_cli(keyless, "backup", "verify", "--corruption-only", str(source.backup))
    assert unauthenticated.returncode == 0, unauthenticated.stderr
    assert "NOT authenticated" in unauthenticated.stdout


def test_restore_refuses_a_non_empty_target_and_writes_nothing(services: Settings, source: Source,
                                                               restored: tuple[Settings, RestoreReport]) -> None:
    target, _ = restored
    before = (end_offsets(target, target.events_topic), ledger_state(target))
    with pytest.raises(EvpError, match=rf"topic '{target.events_topic}' is not empty.*new EVP_TOPIC_PREFIX"):
        restore_backup(source.backup, target)
    assert (end_offsets(target, target.events_topic), ledger_state(target)) == before

    # an empty topic over a ledger that holds events is refused too, before any topic is created
    other = target.with_(topic_prefix=new_topic_prefix())
    try:
        with pytest.raises(EvpError, match="already holds .* events"):
            restore_backup(source.backup, other)
        assert end_offsets(other, other.events_topic) == {}
        with pytest.raises(ConfigurationError, match="EVP_PARTITIONS=3"):
            restore_backup(source.backup, other.with_(partitions=5))
    finally:
        delete_topics(other)


def test_schema_subjects_follow_the_restored_topic() -> None:
    record = b'{"id": 4, "schema": "{}", "subject": "old.events-digits.SampleSubmitted", "version": 2}'
    moved = retarget_schema_record(record, "old.events", "new.events")
    assert b'"subject": "new.events-digits.SampleSubmitted"' in moved and b'"id": 4' in moved
    assert retarget_schema_record(b"not json", "old.events", "new.events") == b"not json"
    assert retarget_schema_record(record, "other.events", "new.events") == record


# -- crypto-shredding ----------------------------------------------------------------------
def test_forgetting_someone_reaches_backups_taken_before(services: Settings, settings: Settings, store: EventStore,
                                                         tmp_path: Path) -> None:
    rng = random.Random()
    people = tuple(make_people(rng, 2))
    marker = random_marker(rng, "backup")
    seed_people(store, people, marker)
    before_erasure = backup_file(settings, tmp_path / "before")
    personal = PlaintextScanner(n for p in people for n in p.personal)
    control = PlaintextScanner([marker])
    sources = {"file": before_erasure.read_bytes(), "records": record_bytes(before_erasure)}
    assert control.scan(sources).keys() >= {"records"}, "the scanner must see what the file holds"
    assert personal.scan(sources) == {}

    with closing(PostgresKeyStore(settings.database_url)) as live_keys:
        old_keys = MemoryKeyStore()  # a key copy taken before the erasure (say, a stale key backup)
        copy_keys(live_keys, old_keys)
        forgotten, kept = people
        forget_subject(store, forgotten.annotator_id, reason="test")
        stale = old_keys.get(forgotten.annotator_id)
        assert stale is not None and not stale.erased  # that copy alone could still decrypt them
        assert personal.scan({"file": before_erasure.read_bytes(), "records": record_bytes(before_erasure)}) == {}
        after_erasure = backup_file(settings, tmp_path / "after")

        for backup, keys in ((before_erasure, live_keys), (after_erasure, old_keys)):
            with private_settings(services, tmp_path / f"restored-{backup.parent.name}", kek_file=settings.kek_path) as target:
                report = restore_backup(backup.parent, target, keys=keys)
                with EventStore.open(target) as copy:
                    gone = copy.read_stream(forgotten.stream_id)[0].data
                    assert (gone["name"], gone["email"]) == (REDACTED, REDACTED), backup.name
                    still = copy.read_stream(kept.stream_id)[0].data
                    assert (still["name"], still["email"]) == (kept.name, kept.email)
                # the stale key copy is overruled by the erasure recorded in the log itself
                assert report.erasures_applied == (() if backup is before_erasure else (forgotten.annotator_id,))


# -- the command line ----------------------------------------------------------------------
def test_cli_creates_and_verifies_a_backup_and_reports_tampering(source: Source, tmp_path: Path) -> None:
    folder = tmp_path / "cli"
    created = run_cli(source.settings, "backup", "create", str(folder))
    assert created.returncode == 0, created.stderr
    (path,) = folder.iterdir()
    manifest = verify_backup(path, source.key)
    assert f"sha256 {manifest.sha256}" in created.stdout and f"mac {manifest.mac}" in created.stdout
    assert manifest.records == manifest_of(source.file).records

    verified = run_cli(source.settings, "backup", "verify", str(folder))
    assert verified.returncode == 0, verified.stderr
    assert f"verified 1 backups ({manifest.records} records): authentic (MACs under backup key {source.key.key_id})" \
        in verified.stdout

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    broken = run_cli(source.settings, "backup", "verify", str(folder))
    assert broken.returncode == 1 and "evp: error:" in broken.stderr and str(path) in broken.stderr

    refused = run_cli(source.settings, "backup", "restore", str(source.backup))
    assert refused.returncode == 1 and "is not empty" in refused.stderr


def test_restore_takes_the_keyring_url_from_the_environment_or_a_private_file(source: Source, tmp_path: Path) -> None:
    """Never from argv with a password in it: the options are parsed, the keyring opened, the restore reached."""
    url = source.settings.database_url.replace("://evp@", "://evp:s3cret-pw@", 1)
    assert "s3cret-pw" in url
    in_argv = run_cli(source.settings, "backup", "restore", "--keys-from", url, str(source.backup))
    assert in_argv.returncode == 2 and "s3cret-pw" not in in_argv.stderr + in_argv.stdout
    assert "holds a password" in in_argv.stderr and "--keys-from-env VAR" in in_argv.stderr
    assert "--keys-from-file PATH" in in_argv.stderr

    # Trust authentication ignores the password: reaching "is not empty" proves the URL was used.
    settings = source.settings.with_()
    env_run = run_cli_env(settings, {"EVP_TEST_KEYRING_URL": url},
                          "backup", "restore", "--keys-from-env", "EVP_TEST_KEYRING_URL", str(source.backup))
    assert env_run.returncode == 1 and "is not empty" in env_run.stderr, env_run.stderr
    missing = run_cli(settings, "backup", "restore", "--keys-from-env", "EVP_TEST_NOT_SET", str(source.backup))
    assert missing.returncode == 1 and "EVP_TEST_NOT_SET: that environment variable is unset" in missing.stderr

    secret = tmp_path / "keyring-url"
    secret.write_text(url + "\n")
    secret.chmod(0o644)
    loose = run_cli(settings, "backup", "restore", "--keys-from-file", str(secret), str(source.backup))
    assert loose.returncode == 1 and "has mode 0644" in loose.stderr and "chmod 600" in loose.stderr
    assert "s3cret-pw" not in loose.stderr
    secret.chmod(0o600)
    tight = run_cli(settings, "backup", "restore", "--keys-from-file", str(secret), str(source.backup))
    assert tight.returncode == 1 and "is not empty" in tight.stderr, tight.stderr
    assert "s3cret-pw" not in tight.stderr + tight.stdout


def run_cli_env(settings: Settings, extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`run_cli` with extra environment variables (a keyring URL held in one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")}
    env.update(settings.to_env())
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "events.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), timeout=120)


def test_a_backup_still_authenticates_after_the_kek_is_rotated(settings: Settings, tmp_path: Path) -> None:
    """The backup key is the deployment's own, not derived from the KEK that rotation retires."""
    with EventStore.open(settings) as store:
        store.append("sample-r", Event("SampleSubmitted", {"sample_id": "r", "annotator_id": "a",
                                                           "features": [0.0] * 64, "label": 1}))
        store.flush()
    path = backup_file(settings, tmp_path / "before-rotation")
    manifest = manifest_of(path)
    old_kek = settings.kek_path.read_bytes()
    rotated = run_cli(settings, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert settings.kek_path.read_bytes() != old_kek  # a new KEK is current
    assert verify_backup(path, BackupKey.from_settings(settings)) == manifest
