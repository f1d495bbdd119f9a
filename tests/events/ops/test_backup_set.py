"""Backup sets against real Kafka and PostgreSQL: incremental chains, consistent cuts, proofs of equality.

The property: for random histories cut into a random number of backups (one full, then
incrementals), restoring the chain into empty services gives the same chain heads as the
source's relays recorded and a rebuilt view with the source view's digest; and a restore of
any earlier backup of the chain equals the log as it was at that backup's cut.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from events.adapters.storage import Storage
from events.errors import EvpError, IntegrityError, NotFound
from events.event import Event
from events.ops import backup_set
from events.ops.backup import INCREMENTAL, BackupFile, BackupKey
from events.ops.backup_set import ProofCheck, chain_to, create_backup, manifests, verify_set
from events.ops.restore import restore_backup
from events.privacy.keyring import PostgresKeyStore
from events.settings import Settings
from events.store.aggregate import save_snapshot
from events.store.client import EventStore
from events.store.cut import Cut
from events.ops.integrity import verify_log
from projections import tables
from projections.declarations import catch_up_views, load_view
from tests.conftest import private_settings
from tests.support.examples import DIGITS, project
from tests.support.plaintext import make_people, register, submit
from tests.support.topics import recreate_events_topic

pytestmark = pytest.mark.services


def chain_heads(settings: Settings) -> dict[int, str]:
    """What the source's relays recorded as each partition's head."""
    with psycopg.connect(settings.database_url) as conn:
        return {p: bytes(c).hex() for p, c in conn.execute("SELECT partition, chain FROM evp_chain_heads")}


def view_digest(settings: Settings) -> str:
    catch_up_views(settings, project(DIGITS), ["samples"])
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        return tables.digest(conn, load_view(project(DIGITS), "samples")).sha256


def grow(store: EventStore, rng: random.Random, size: int) -> None:
    """A random stretch of history: signups (reservations), samples, releases with aggregate snapshots."""
    for person in make_people(rng, rng.randint(0, 2)):
        register(store, person)
        submit(store, person, [f"{person.annotator_id}-{uuid.uuid4().hex[:6]}" for _ in range(rng.randint(0, size))],
               "backup-set")
    release = f"release-{uuid.uuid4().hex[:8]}"
    store.append(release, Event("ReleaseRequested", {"release_id": release, "bar": 0.9, "epochs": rng.randint(1, 9)}))
    if rng.random() < 0.5:
        save_snapshot(store, release, 1, {"asked": True})
    store.flush()


@pytest.fixture
def digits_settings(settings: Settings) -> Settings:
    return settings.with_(project=project(DIGITS).root)


@hsettings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), backups=st.integers(1, 3))
def test_restore_of_a_backup_chain_has_equal_chain_heads_and_view_digests(
        services: Settings, tmp_path_factory: pytest.TempPathFactory, seed: int, backups: int) -> None:
    rng = random.Random(seed)
    folder = tmp_path_factory.mktemp("chain")
    with private_settings(services, folder / "source", project=project(DIGITS).root) as source:
        check_chain(services, source, folder, rng, backups)


def check_chain(services: Settings, source: Settings, folder: Path, rng: random.Random, backups: int) -> None:
    location = folder / "set"
    taken: list[tuple[int, dict[int, str], str]] = []  # per backup: its sequence, the source's heads, the view's digest
    with EventStore.open(source) as store:
        for n in range(backups):
            grow(store, rng, 3)
            digest = view_digest(source)  # the view at the cut: recorded by the backup
            made = create_backup(source, location, incremental=n > 0)
            assert made.kind == (INCREMENTAL if n else "full") and made.proofs["views"]["samples"]["sha256"] == digest
            taken.append((made.sequence, chain_heads(source), digest))
    assert [m.sequence for m in verify_set(location, BackupKey.from_settings(source)).backups] == [t[0] for t in taken]
    reservations = count(source, "evp_reservations")
    snapshots = count(source, "evp_aggregate_snapshots")
    for sequence, heads, digest in (taken[-1], taken[0]) if backups > 1 else taken:
        with private_settings(services, folder / f"restored-{sequence}", kek_file=source.kek_path,
                              project=source.project) as target, \
                closing(PostgresKeyStore(source.database_url)) as keys:
            report = restore_backup(location, target, keys=keys, sequence=sequence)
            assert report.backups == tuple(range(1, sequence + 1))
            assert report.proved, str(report)
            found = {c.name: c for c in report.proofs}
            assert {p: found[f"partition {p}"].found for p in heads} == heads
            assert found["samples"].found == digest
            assert view_digest(target) == digest
            if sequence == taken[-1][0]:
                assert (report.reservations, report.snapshots) == (reservations, snapshots)
                assert count(target, "evp_reservations") == reservations
            # the restored relays continue each partition's chain from its restored head
            with EventStore.open(target) as copy:
                copy.append(f"release-after-{sequence}", Event("ReleaseRequested", {
                    "release_id": "after", "bar": 0.5, "epochs": 1}))
                copy.flush()
                assert verify_log(copy).findings == []


def count(settings: Settings, table: str) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0


def test_an_fsspec_url_holds_a_set_and_incrementals_hold_only_what_is_new(
        services: Settings, digits_settings: Settings, tmp_path: Path) -> None:
    location = f"memory://evp-test-{uuid.uuid4().hex[:8]}/backups"
    rng = random.Random(7)
    with EventStore.open(digits_settings) as store:
        grow(store, rng, 4)
        person = make_people(rng, 1)[0]
        register(store, person)
        store.flush()
        save_snapshot(store, person.stream_id, 1, {"email": person.email})  # plaintext: never in a backup
        full = create_backup(digits_settings, location)
    assert full.state.get("SNAPSHOTS", 0) == count(digits_settings, "evp_aggregate_snapshots") - 1
    with BackupFile(Storage(location), full.name) as written:  # records decompressed: what a reader sees
        assert not any(person.email.encode() in (r.value or b"") for r in written.records())
    with EventStore.open(digits_settings) as store:
        second = create_backup(digits_settings, location, incremental=True)
        grow(store, rng, 4)
        third = create_backup(digits_settings, location, incremental=True)
    assert second.records == 0 and second.parent is not None and second.parent.mac == full.mac
    assert third.records > 0 and all(third.ranges[p][0] == full.ranges[p][1] for p in full.ranges)
    assert Storage(location).names() == [full.name, second.name, third.name]
    assert [m.sequence for m in chain_to(Storage(location))] == [1, 2, 3]
    with private_settings(services, tmp_path / "restored", kek_file=digits_settings.kek_path,
                          project=digits_settings.project) as target:
        report = restore_backup(location, target)
        assert report.proved and report.records == full.records + third.records


def test_a_missing_or_replaced_parent_breaks_the_chain_by_name(digits_settings: Settings, tmp_path: Path) -> None:
    location = tmp_path / "set"
    key = BackupKey.from_settings(digits_settings, create=True)
    with EventStore.open(digits_settings) as store:
        grow(store, random.Random(3), 2)
        full = create_backup(digits_settings, location)
        grow(store, random.Random(4), 2)
        child = create_backup(digits_settings, location, incremental=True)
    assert len(verify_set(location, key).backups) == 2
    original = (location / full.name).read_bytes()
    # Another full backup under the parent's name: its MAC is not the one the child recorded.
    (location / full.name).unlink()
    other = tmp_path / "other"
    replacement = create_backup(digits_settings, other)
    (other / replacement.name).rename(location / full.name)
    with pytest.raises(IntegrityError, match=rf"{child.name} continues backup 1 with MAC .* replaced"):
        verify_set(location, key)
    (location / full.name).unlink()
    with pytest.raises(IntegrityError, match=rf"{child.name} continues backup 1, which is missing"):
        verify_set(location, key)
    with pytest.raises(IntegrityError, match="missing from the set"):
        chain_to(Storage(location))
    (location / full.name).write_bytes(original)
    assert len(verify_set(location, key).backups) == 2
    # A damaged incremental is named.
    data = (location / child.name).read_bytes()
    (location / child.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match=child.name):
        verify_set(location, key)


def test_an_incremental_over_a_recreated_topic_is_refused(digits_settings: Settings, tmp_path: Path) -> None:
    with EventStore.open(digits_settings) as store:
        grow(store, random.Random(5), 3)
        create_backup(digits_settings, tmp_path / "set")
        recreate_events_topic(digits_settings)
        with pytest.raises(EvpError, match="recreated or truncated; take a full backup"):
            create_backup(digits_settings, tmp_path / "set", incremental=True)
    with pytest.raises(NotFound, match="take a full backup first"):
        create_backup(digits_settings, tmp_path / "empty", incremental=True)


def test_a_cut_that_is_not_one_point_is_taken_again(digits_settings: Settings, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A record above the ledger position read in the snapshot (as a relay re-send leaves one) discards the attempt."""
    with EventStore.open(digits_settings) as store:
        grow(store, random.Random(6), 3)
    real_snapshot, real_cut = backup_set._snapshot_of_ledger, backup_set._cut
    calls: list[int] = []

    def one_behind_first(settings: Settings) -> tuple[int, list[Any]]:
        position, state = real_snapshot(settings)
        calls.append(position)
        return (position - 1 if len(calls) == 1 else position), state

    def ends_of_the_next(settings: Settings, position: int, publish: Any) -> Cut:
        """The first cut's ends hold the record one position above the snapshot's, as a re-send below them would."""
        return Cut(position, real_cut(settings, position + 1 if len(calls) == 1 else position, publish).ends)

    monkeypatch.setattr(backup_set, "_snapshot_of_ledger", one_behind_first)
    monkeypatch.setattr(backup_set, "_cut", ends_of_the_next)
    made = create_backup(digits_settings, tmp_path / "set")
    assert len(calls) == 2 and made.position == calls[1]
    assert manifests(Storage(tmp_path / "set")) == [made]


def test_a_proof_that_differs_is_reported_not_hidden(services: Settings, digits_settings: Settings,
                                                      tmp_path: Path) -> None:
    class Lying:
        def record(self, settings: Settings, ends: Mapping[int, int]) -> Mapping[str, Any]:
            return {"thing": "a"}

        def check(self, settings: Settings, recorded: Mapping[str, Any]) -> list[ProofCheck]:
            return [ProofCheck("lying", "thing", recorded["thing"], "b")]

    with EventStore.open(digits_settings) as store:
        grow(store, random.Random(8), 1)
    made = create_backup(digits_settings, tmp_path / "set", providers={"lying": Lying()})
    assert made.proofs == {"lying": {"thing": "a"}}
    with private_settings(services, tmp_path / "restored", kek_file=digits_settings.kek_path) as target:
        report = restore_backup(tmp_path / "set", target, providers={"lying": Lying()})
    assert not report.proved and "lying thing: DIFFERENT: backup a, restored b" in str(report)
    assert all(c.equal for c in report.proofs if c.proof == "chain")


def test_the_cli_lists_verifies_and_restores_a_chain(services: Settings, digits_settings: Settings,
                                                      tmp_path: Path) -> None:
    import json

    from tests.support.plaintext import run_cli

    location = str(tmp_path / "set")
    with EventStore.open(digits_settings) as store:
        grow(store, random.Random(9), 2)
        view_digest(digits_settings)
        assert run_cli(digits_settings, "backup", "create", location).returncode == 0
        grow(store, random.Random(10), 2)
        view_digest(digits_settings)
        made = run_cli(digits_settings, "backup", "create", "--incremental", "--json", location)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["parent"]["sequence"] == 1
    listed = json.loads(run_cli(digits_settings, "backup", "list", "--json", location).stdout)
    assert [(b["sequence"], b["kind"]) for b in listed["backups"]] == [(1, "full"), (2, "incremental")]
    verified = run_cli(digits_settings, "backup", "verify", location)
    assert verified.returncode == 0 and "verified 2 backups" in verified.stdout, verified.stderr
    with private_settings(services, tmp_path / "restored", kek_file=digits_settings.kek_path,
                          project=digits_settings.project) as target:
        restored = run_cli(target, "backup", "restore", location)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert "views samples: equal" in restored.stdout and "proved equal to the backup" in restored.stdout
    missing = run_cli(digits_settings, "backup", "list")
    assert missing.returncode == 1 and "EVP_BACKUP_TARGET" in missing.stderr


def test_a_restore_drill_proves_the_set_in_a_sandbox_of_its_own(digits_settings: Settings, tmp_path: Path) -> None:
    import json

    from events.settings import with_database
    from tests.conftest import delete_topics, drop_database
    from tests.support.plaintext import run_cli

    with EventStore.open(digits_settings) as store:
        grow(store, random.Random(11), 3)
    view_digest(digits_settings)
    create_backup(digits_settings, tmp_path / "set")
    sandbox = f"evp_test_drill_{uuid.uuid4().hex[:8]}"
    drilled = run_cli(digits_settings, "backup", "drill", "--sandbox", sandbox, "--json", str(tmp_path / "set"))
    try:
        assert drilled.returncode == 0, drilled.stdout + drilled.stderr
        body = json.loads(drilled.stdout)
        assert body["proved"] and {c["name"] for c in body["proofs"]} >= {"samples", "partition 0"}
        assert sandbox in body["database"]
    finally:
        sandboxed = digits_settings.with_(database_url=with_database(digits_settings.database_url, sandbox))
        drop_database(digits_settings, sandboxed.database_url)
        delete_topics(digits_settings.with_(topic_prefix=sandbox.replace("_", "") + "-"))


def test_the_lineage_report_names_each_backup_holding_a_subject_and_what_the_erasure_made_of_it(
        digits_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from events.ops.forget import forget_subject
    from events.ops.lineage import HOLDS, KEPT, UNREADABLE, collect_lineage

    location = tmp_path / "set"
    monkeypatch.setenv(backup_set.BACKUP_TARGET_ENV, str(location))
    person = make_people(random.Random(12), 1)[0]
    with EventStore.open(digits_settings) as store:
        register(store, person)
        submit(store, person, ["l-1", "l-2"], "lineage")
        store.flush()
        full = create_backup(digits_settings, location)
        submit(store, person, ["l-3"], "lineage")
        store.flush()
        incremental = create_backup(digits_settings, location, incremental=True)
        grow(store, random.Random(13), 1)  # others' events: never counted for this subject
        store.flush()
        create_backup(digits_settings, location, incremental=True)

        def report() -> dict[tuple[str, str], int]:
            found = collect_lineage(digits_settings, None, person.annotator_id,
                                    sources={"backups": backup_set.backup_holdings})
            return {(h.where.rsplit("/", 1)[-1], h.state): h.count for h in found.holdings}

        assert report() == {(full.name, HOLDS): 1, (full.name, KEPT): 2, (incremental.name, KEPT): 1}
        forget_subject(store, person.annotator_id, reason="test")
    assert report() == {(full.name, UNREADABLE): 1, (full.name, KEPT): 2, (incremental.name, KEPT): 1}
    monkeypatch.delenv(backup_set.BACKUP_TARGET_ENV)
    assert report() == {}
