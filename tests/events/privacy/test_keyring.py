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
from psycopg.conninfo import make_conninfo

from events.privacy import cipher
from events.errors import ConfigurationError, CryptoError, KeyErased, NotFound, ServiceUnavailable
from events.privacy.kek import LocalKek, kek_from_settings
from events.privacy.keyring import INDEX_KEY_SUBJECT, Keyring, KeyStore, MemoryKeyStore, PostgresKeyStore, StoredKey
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
    admin = make_conninfo(Settings.from_env().database_url, dbname="postgres")
    name = f"evp_test_{uuid.uuid4().hex}"
    with _connect_when_up(admin) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(admin, dbname=name)
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
        conn.execute("TRUNCATE evp_data_keys")
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
    with pytest.raises(CryptoError, match="does not match"):
        Keyring(store, kek).data_key("ada", create=False)


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
