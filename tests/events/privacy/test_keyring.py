"""Key-encryption keys and the keyring.

The keyring contract is written once and runs against every :class:`KeyStore`: the
in-memory one and PostgreSQL (a private database per module, ``-m services``).
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from events.privacy import cipher
from events.errors import ConfigurationError, CryptoError, KeyErased, NotFound, ServiceUnavailable
from events.privacy.kek import KeyFiles, LocalKek, kek_finder, kek_from_settings
from events.privacy.keyring import (
    INDEX_KEY_SUBJECT,
    InvalidSubject,
    KekRetired,
    KekState,
    Keyring,
    KeyStore,
    MemoryKeyStore,
    PostgresKeyStore,
    StoredKey,
    canonical_subject,
    index_key_id,
    subject_problem,
)
from events.settings import Settings

T = TypeVar("T")
AAD = cipher.field_aad("ev-1", "LabelAssigned", "annotator_email", "ada")

# --- key-encryption keys ---------------------------------------------------------------


def test_wrap_unwrap_round_trips_and_hides_the_key() -> None:
    kek, data_key = LocalKek.generate(), bytes(range(32))
    wrapped = kek.wrap(data_key, subject_id="ada")
    assert data_key not in wrapped
    assert kek.wrap(data_key, subject_id="ada") != wrapped  # fresh nonce
    assert kek.unwrap(wrapped, subject_id="ada") == data_key


def test_the_wrong_kek_is_named_with_both_key_ids() -> None:
    right, wrong = LocalKek.generate(), LocalKek.generate()
    wrapped = right.wrap(bytes(32), subject_id="ada")
    with pytest.raises(CryptoError, match="key-encryption key does not match") as caught:
        wrong.unwrap(wrapped, subject_id="ada")
    assert right.key_id in str(caught.value) and wrong.key_id in str(caught.value)


def test_a_wrapped_key_swapped_to_another_subject_does_not_unwrap() -> None:
    kek = LocalKek.generate()
    with pytest.raises(CryptoError, match="another subject"):
        kek.unwrap(kek.wrap(bytes(32), subject_id="ada"), subject_id="bob")


def test_a_tampered_or_truncated_wrapped_key_does_not_unwrap() -> None:
    kek = LocalKek.generate()
    wrapped = bytearray(kek.wrap(bytes(32), subject_id="ada"))
    wrapped[-1] ^= 1
    with pytest.raises(CryptoError, match="failed authentication"):
        kek.unwrap(bytes(wrapped), subject_id="ada")
    with pytest.raises(CryptoError, match="malformed"):
        kek.unwrap(bytes(wrapped[:-1]), subject_id="ada")


def test_key_id_is_stable_short_and_not_the_secret() -> None:
    secret = bytes(range(32))
    kek = LocalKek(secret)
    assert kek.key_id == LocalKek(secret).key_id != LocalKek.generate().key_id
    assert len(kek.key_id) == 16 and kek.key_id not in secret.hex()
    assert kek.export_base64() not in repr(kek)
    assert LocalKek.from_base64(kek.export_base64()).key_id == kek.key_id


def test_from_base64_refuses_the_wrong_length_naming_the_source() -> None:
    with pytest.raises(ConfigurationError, match=r"EVP_KEK must hold 32 bytes.*16 bytes"):
        LocalKek.from_base64("AAAAAAAAAAAAAAAAAAAAAA==", source="EVP_KEK")


def test_load_or_create_makes_a_private_file_and_returns_the_same_key_after(tmp_path: Path) -> None:
    path = tmp_path / "home" / "keyring" / "kek"
    first = LocalKek.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert LocalKek.load_or_create(path).key_id == first.key_id
    assert [p.name for p in path.parent.iterdir()] == ["kek"]  # no temporary left behind


def test_load_or_create_from_many_threads_agrees_on_one_key(tmp_path: Path) -> None:
    ids = _race(8, lambda: LocalKek.load_or_create(tmp_path / "kek").key_id)
    assert len(set(ids)) == 1


@pytest.mark.parametrize("content", ["not base64!", "AAAA", ""])
def test_a_malformed_kek_file_is_refused_naming_its_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "kek"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=str(path)):
        LocalKek.load_or_create(path)
    assert path.read_text() == content  # never overwritten


def test_kek_from_settings_prefers_evp_kek_over_the_file(tmp_path: Path) -> None:
    given = LocalKek.generate()
    settings = Settings(home=tmp_path, kek=given.export_base64())
    assert kek_from_settings(settings).key_id == given.key_id
    assert not settings.kek_path.exists()
    from_file = kek_from_settings(Settings(home=tmp_path))
    assert settings.kek_path.exists() and from_file.key_id == kek_from_settings(Settings(home=tmp_path)).key_id


# --- key stores: one contract, every backend -------------------------------------------


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh database for this module on the configured server, dropped afterwards."""
    settings = Settings.from_env()
    admin = settings.admin_url("the key store tests (they create a database)", "postgres")
    name = f"evp_test_{uuid.uuid4().hex}"
    with _connect_when_up(admin) as conn:
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{conninfo_to_dict(settings.database_url).get("user") or "evp"}"')
    try:
        yield make_conninfo(settings.database_url, dbname=name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _connect_when_up(conninfo: str, patience_s: float = 30.0) -> psycopg.Connection[tuple[object, ...]]:
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return psycopg.connect(conninfo, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as err:
            if time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL is not reachable ({err}); start it with: python3 platform/services.py up")
            time.sleep(1)


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest) -> KeyStore:
    if request.param == "memory":
        return MemoryKeyStore()
    url = request.getfixturevalue("postgres_url")
    postgres = PostgresKeyStore(url)
    postgres.ensure_schema()
    postgres.ensure_schema()  # idempotent
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE evp_keyring.evp_data_keys, evp_keyring.evp_kek_state")
        conn.execute("INSERT INTO evp_keyring.evp_kek_state (id) VALUES (1)")
    return postgres


@pytest.fixture
def kek() -> LocalKek:
    return LocalKek.generate()


def _race(threads: int, work: Callable[[], T]) -> list[T]:
    """Run ``work`` in ``threads`` threads released at the same instant."""
    barrier = threading.Barrier(threads)
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(work())
        except BaseException as err:  # surfaced below, in the test's thread
            errors.append(err)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return results


def test_a_key_is_created_once_and_found_again(store: KeyStore, kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    with pytest.raises(NotFound, match="ada"):
        keyring.data_key("ada", create=False)
    key = keyring.data_key("ada", create=True)
    assert len(key) == 32
    assert keyring.data_key("ada", create=True) == key
    assert Keyring(store, kek).data_key("ada", create=False) == key  # from the store, not a cache
    assert Keyring(store, kek).data_key("bob", create=True) != key
    stored = store.get("ada")
    assert stored is not None and stored.kek_id == kek.key_id and stored.wrapped is not None
    assert key not in stored.wrapped and stored.erased_at is None


def test_forget_erases_the_key_and_keeps_a_tombstone(store: KeyStore, kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    sealed = cipher.seal_text(keyring.data_key("ada", create=True), "ada@example.org", AAD)
    keyring.data_key("bob", create=True)
    assert keyring.forget("ada") is True
    assert keyring.forget("ada") is False
    stored = store.get("ada")
    assert stored is not None and stored.erased and stored.erased_at is not None
    for reader in (keyring, Keyring(store, kek)):  # the cache was dropped too
        with pytest.raises(KeyErased, match="ada"):
            reader.data_key("ada", create=False)
    assert not any(row.wrapped and row.subject_id == "ada" for row in store.all())
    assert len(keyring.data_key("bob", create=False)) == 32  # others untouched
    assert cipher.is_sealed(sealed)  # the ciphertext remains, its key is gone


def test_forget_never_resurrects_a_key(store: KeyStore, kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    keyring.data_key("ada", create=True)
    keyring.forget("ada")
    for writer in (keyring, Keyring(store, kek)):
        with pytest.raises(KeyErased):
            writer.data_key("ada", create=True)
    stored = store.get("ada")
    assert stored is not None and stored.erased


def test_forgetting_a_subject_never_seen_keeps_it_forgotten(store: KeyStore, kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    assert keyring.forget("carol") is False
    with pytest.raises(KeyErased):
        keyring.data_key("carol", create=True)


def test_reserved_subject_ids_cannot_be_forgotten_or_used(store: KeyStore, kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    index_key = keyring.index_key()
    with pytest.raises(CryptoError, match="reserved"):
        keyring.forget(INDEX_KEY_SUBJECT)
    with pytest.raises(CryptoError, match="reserved"):
        keyring.data_key(INDEX_KEY_SUBJECT, create=False)
    assert Keyring(store, kek).index_key() == index_key


def test_a_keyring_with_another_kek_names_both_key_ids(store: KeyStore, kek: LocalKek) -> None:
    Keyring(store, kek).data_key("ada", create=True)
    stranger = LocalKek.generate()
    with pytest.raises(CryptoError, match="does not match") as caught:
        Keyring(store, stranger).data_key("ada", create=False)
    assert kek.key_id in str(caught.value) and stranger.key_id in str(caught.value)


def test_rotate_rewraps_every_live_key_so_the_old_kek_can_be_discarded(store: KeyStore, kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    keys = {subject: keyring.data_key(subject, create=True) for subject in ("ada", "bob")}
    keyring.data_key("carol", create=True)
    keyring.forget("carol")
    index_key = keyring.index_key()
    sealed = cipher.seal_text(keys["ada"], "ada@example.org", AAD)

    new_kek = LocalKek.generate()
    assert keyring.rotate(new_kek) == 3  # ada, bob and the blind-index key; not carol's tombstone
    assert keyring.kek_id == new_kek.key_id

    fresh = Keyring(store, LocalKek.from_base64(new_kek.export_base64()))  # only the new KEK
    assert cipher.open_text(fresh.data_key("ada", create=False), sealed, AAD) == "ada@example.org"
    assert fresh.data_key("bob", create=False) == keys["bob"]
    assert fresh.index_key() == index_key
    with pytest.raises(KeyErased):
        fresh.data_key("carol", create=False)
    assert {row.kek_id for row in store.all() if not row.erased} == {new_kek.key_id}
    assert store.kek_state() == KekState(new_kek.key_id, retired=(kek.key_id,))
    with pytest.raises(KekRetired) as caught:  # the old KEK opens nothing, and says why
        Keyring(store, kek).data_key("ada", create=False)
    assert kek.key_id in str(caught.value) and new_kek.key_id in str(caught.value)


def test_rotate_with_the_wrong_current_kek_changes_nothing(store: KeyStore, kek: LocalKek) -> None:
    Keyring(store, kek).data_key("ada", create=True)
    before = list(store.all())
    with pytest.raises(CryptoError, match="does not match"):
        Keyring(store, LocalKek.generate()).rotate(LocalKek.generate())
    assert list(store.all()) == before


def test_concurrent_put_if_absent_stores_one_key(store: KeyStore, kek: LocalKek) -> None:
    def put() -> StoredKey:
        wrapped = kek.wrap(os.urandom(cipher.KEY_BYTES), subject_id="ada")
        return store.put_if_absent(StoredKey("ada", kek.key_id, wrapped, datetime.now(UTC)))

    winners = _race(2, put)
    assert winners[0] == winners[1] == store.get("ada")


def test_concurrent_keyrings_agree_on_one_data_key(store: KeyStore, kek: LocalKek) -> None:
    keys = _race(4, lambda: Keyring(store, kek).data_key("ada", create=True))
    assert len(set(keys)) == 1


def test_an_unreachable_server_is_reported_without_the_password() -> None:
    keys = PostgresKeyStore("postgresql://evp:hunter2@127.0.0.1:1/evp_keys?connect_timeout=2")
    with pytest.raises(ServiceUnavailable, match=re.escape("postgresql at 127.0.0.1:1/evp_keys")) as caught:
        keys.get("ada")
    assert "hunter2" not in str(caught.value)


def test_another_keyring_stops_using_a_forgotten_key_once_its_cache_expires() -> None:
    store = MemoryKeyStore()
    kek = LocalKek.generate()
    writer = Keyring(store, kek, cache_seconds=0.05)
    other = Keyring(store, kek)
    key = writer.data_key("s1", create=True)
    other.forget("s1")
    assert writer.data_key("s1", create=True) == key  # still cached in the writer's process
    time.sleep(0.06)
    with pytest.raises(KeyErased):
        writer.data_key("s1", create=True)


# --- key files: written once, never overwritten ----------------------------------------


def test_key_files_are_named_by_key_id_and_never_overwritten(tmp_path: Path) -> None:
    files = KeyFiles(tmp_path / "keyring" / "kek")
    first, second = LocalKek.generate(), LocalKek.generate()
    path = files.write(first)
    assert path.name == f"kek.{first.key_id}" and stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    assert files.write(first) == path and path.read_bytes() == before  # idempotent, same bytes
    path.write_text(second.export_base64() + "\n")  # a file under the wrong name is never "fixed" by overwriting
    with pytest.raises(CryptoError, match=f"holds key-encryption key {second.key_id}, not {first.key_id}"):
        files.write(first)
    assert path.read_text().strip() == second.export_base64()


def test_the_pointer_switches_atomically_and_the_current_key_cannot_be_retired(tmp_path: Path) -> None:
    pointer = tmp_path / "kek"
    old = LocalKek.load_or_create(pointer)  # a deployment never rotated: a plain key file
    new = LocalKek.generate()
    files = KeyFiles(pointer)
    files.write(old)
    files.write(new)
    files.point_to(new.key_id)
    assert pointer.is_symlink() and LocalKek.load_or_create(pointer).key_id == new.key_id
    assert kek_from_settings(Settings(home=tmp_path, kek_file=pointer)).key_id == new.key_id
    with pytest.raises(CryptoError, match="cannot be retired"):
        files.retire(new.key_id)
    assert files.retire(old.key_id) == [files.path_of(old.key_id)]
    assert files.load(old.key_id) is None and files.load(new.key_id) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kek", f"kek.{new.key_id}"]  # no temporary left


def test_a_dangling_key_link_is_refused_and_never_replaced_by_a_new_key(tmp_path: Path) -> None:
    pointer = tmp_path / "kek"
    pointer.symlink_to("kek.0123456789abcdef")
    with pytest.raises(ConfigurationError, match="does not exist"):
        LocalKek.load_or_create(pointer)
    assert pointer.is_symlink() and not pointer.exists()


# --- a rotation other processes notice -------------------------------------------------


def test_a_keyring_holding_a_retired_kek_is_refused_naming_both_ids(store: KeyStore, kek: LocalKek) -> None:
    stale = Keyring(store, kek, kek_check_seconds=3600.0)  # it would not look again for an hour
    stale.data_key("ada", create=True)
    new_kek = LocalKek.generate()
    Keyring(store, kek).rotate(new_kek)

    with pytest.raises(KekRetired) as caught:  # the store checks when it inserts: no wait for the next look
        stale.data_key("bob", create=True)
    assert (caught.value.held, caught.value.current) == (kek.key_id, new_kek.key_id)
    assert kek.key_id in str(caught.value) and new_kek.key_id in str(caught.value)
    assert store.get("bob") is None  # nothing was wrapped under the retired KEK
    with pytest.raises(KekRetired):
        stale.index_key()  # not cached: it lives under the new KEK now
    assert Keyring(store, new_kek).data_key("bob", create=True)


def test_a_keyring_that_can_find_the_new_kek_follows_the_rotation(store: KeyStore, kek: LocalKek,
                                                                 tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, kek_file=tmp_path / "kek")
    files = KeyFiles(settings.kek_path)
    files.write(kek)
    files.point_to(kek.key_id)
    follower = Keyring(store, kek, kek_check_seconds=0.0, find_kek=kek_finder(settings))
    ada = follower.data_key("ada", create=True)
    new_kek = LocalKek.generate()
    files.write(new_kek)
    Keyring(store, kek).rotate(new_kek)

    bob = follower.data_key("bob", create=True)
    assert follower.kek_id == new_kek.key_id
    stored = store.get("bob")
    assert stored is not None and stored.kek_id == new_kek.key_id
    fresh = Keyring(store, new_kek)
    assert (fresh.data_key("ada", create=False), fresh.data_key("bob", create=False)) == (ada, bob)


def test_a_store_never_accepts_a_key_under_another_kek_than_its_current(store: KeyStore, kek: LocalKek) -> None:
    Keyring(store, kek).data_key("ada", create=True)  # claims the store for kek
    other = LocalKek.generate()
    row = StoredKey("bob", other.key_id, other.wrap(bytes(32), subject_id="bob"), datetime.now(UTC))
    with pytest.raises(CryptoError, match="does not match"):
        store.put_if_absent(row)
    assert store.get("bob") is None
    tombstone = StoredKey("carol", "", None, datetime.now(UTC), datetime.now(UTC))
    assert store.put_if_absent(tombstone).erased  # a tombstone needs no KEK


def test_a_rotation_is_resumable_and_never_moves_a_key_the_current_kek_cannot_open(store: KeyStore,
                                                                                    kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    keys = {s: keyring.data_key(s, create=True) for s in ("a1", "a2", "a3", "a4", "a5")}
    new_kek = LocalKek.generate()
    keyring.begin_rotation(new_kek)
    assert keyring.begin_rotation(new_kek) == store.kek_state()  # recorded once, idempotent
    with pytest.raises(CryptoError, match="in progress"):
        Keyring(store, kek).begin_rotation(LocalKek.generate())  # never a second new key
    batches: list[int] = []
    with pytest.raises(RuntimeError):  # dies after the first batch
        keyring.rewrap(new_kek, batch=2, after_batch=lambda: batches.append(1) or _die())
    assert sorted(r.kek_id for r in store.all()).count(new_kek.key_id) == 2
    resumed = Keyring(store, kek)  # a new process: it has only the old KEK and the state in the store
    assert resumed.rewrap(new_kek, batch=2) == 3
    assert resumed.verify_rotation(new_kek) == 5
    resumed.end_rotation(new_kek)
    fresh = Keyring(store, new_kek)
    assert {s: fresh.data_key(s, create=False) for s in keys} == keys


def _die() -> None:
    raise RuntimeError("killed")


# --- subject ids: no look-alikes -------------------------------------------------------


@pytest.mark.parametrize("subject", ["ann-cy ", " ann-cy", "ann-cy\n", "ann\u200bcy", "ann\x07cy",
                                     "ann-c\u0065\u0301", "ann\u2028cy"])
def test_a_look_alike_subject_id_never_gets_a_key_of_its_own(store: KeyStore, kek: LocalKek, subject: str) -> None:
    keyring = Keyring(store, kek)
    assert subject_problem(subject) is not None
    with pytest.raises(InvalidSubject) as caught:
        keyring.data_key(subject, create=True)
    assert repr(subject) in str(caught.value)
    assert store.get(subject) is None
    assert subject_problem(canonical_subject(subject)) is None


def test_look_alikes_stored_before_the_rule_are_found_and_stay_readable(store: KeyStore, kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    keyring.data_key("ann-cy", create=True)
    keyring.data_key("ann-cz", create=True)  # a different person
    legacy = {}
    for subject in ("ann-cy ", "ann\u200b-cy", "ann-c\u0065\u0301"):  # written before ids were checked
        legacy[subject] = os.urandom(32)
        store.put_if_absent(StoredKey(subject, kek.key_id, kek.wrap(legacy[subject], subject_id=subject),
                                      datetime.now(UTC)))
    assert keyring.lookalikes("ann-cy") == sorted(["ann-cy ", "ann\u200b-cy"])
    assert keyring.lookalikes("ann-c\u00e9") == ["ann-c\u0065\u0301"]
    assert keyring.lookalikes("ann-cz") == []
    assert keyring.data_key("ann-cy ", create=False) == legacy["ann-cy "]  # old data still opens


# --- the blind-index key is versioned --------------------------------------------------


def test_the_blind_index_key_carries_a_version_that_survives_rotation(store: KeyStore, kek: LocalKek) -> None:
    keyring = Keyring(store, kek)
    index_key = keyring.index_key()
    stored = store.get(INDEX_KEY_SUBJECT)
    assert stored is not None and stored.key_id == index_key_id(index_key) == keyring.index_key_id()
    assert stored.key_id not in index_key.hex()
    before = cipher.blind_index(index_key, "email", "ada@example.org")
    new_kek = LocalKek.generate()
    keyring.rotate(new_kek)
    fresh = Keyring(store, new_kek)
    assert fresh.index_key_id() == stored.key_id
    assert cipher.blind_index(fresh.index_key(), "email", "ada@example.org") == before  # no index value changes


def test_a_blind_index_key_from_before_versions_gets_its_version_recorded(store: KeyStore, kek: LocalKek) -> None:
    index_key = os.urandom(32)
    store.put_if_absent(StoredKey(INDEX_KEY_SUBJECT, kek.key_id, kek.wrap(index_key, subject_id=INDEX_KEY_SUBJECT),
                                  datetime.now(UTC)))
    assert Keyring(store, kek).index_key() == index_key  # the same key: existing indexes stay valid
    stored = store.get(INDEX_KEY_SUBJECT)
    assert stored is not None and stored.key_id == index_key_id(index_key)


def test_retiring_a_key_also_deletes_a_temporary_copy_a_killed_writer_left(tmp_path: Path) -> None:
    files = KeyFiles(tmp_path / "kek")
    old, new = LocalKek.generate(), LocalKek.generate()
    files.write(old)
    leftover = tmp_path / f".{files.path_of(old.key_id).name}.a1b2c3.tmp"
    leftover.write_text((files.path_of(old.key_id)).read_text())
    files.write(new)
    files.point_to(new.key_id)
    removed = files.retire(old.key_id)
    assert leftover in removed and not leftover.exists() and not files.path_of(old.key_id).exists()
    assert files.path_of(new.key_id).exists()
