"""``evp keys rotate``: every data key moves to a new key-encryption key, nothing is lost.

After the command, a fresh process holding only the new KEK file reads every old event;
the old KEK opens no wrapped key any more and its file is gone, so a copy of a wrapped key
taken before an erasure (a dump, a dead tuple) opens with nothing; erased subjects stay
erased; a process still holding the old KEK is refused, naming both key ids.
"""

from __future__ import annotations

import random
from pathlib import Path

import psycopg
import pytest

from events.store.client import EventStore
from events.errors import CryptoError, KeyErased
from events.ops.forget import forget_subject
from events.privacy.kek import LocalKek, kek_from_settings
from events.privacy.kek import KeyFiles, kek_finder
from events.privacy.keyring import KekRetired, Keyring, PostgresKeyStore
from events.privacy.personal import REDACTED, blind_index
from events.settings import Settings
from tests.faults.test_key_rotation_kills import rotate_cli
from tests.support.plaintext import make_people, register, registered, run_cli, submit

pytestmark = pytest.mark.services


def test_rotation_rewraps_every_key_and_retires_the_old_kek(store: EventStore, settings: Settings) -> None:
    people = make_people(random.Random(), 3)
    for person in people:
        register(store, person)
        submit(store, person, [f"{person.annotator_id}-1"], "digits")
    forgotten, *kept = people
    keys = PostgresKeyStore(settings.keyring_url)
    dumped = keys.get(forgotten.annotator_id)  # what a dump (or a dead tuple) keeps after the erasure
    forget_subject(store, forgotten.annotator_id, reason="request")
    store.flush()
    old = LocalKek.load_or_create(settings.kek_path)
    assert dumped is not None and dumped.wrapped is not None
    assert old.unwrap(dumped.wrapped, subject_id=forgotten.annotator_id)  # before: the old copy still opens
    live_before = [k for k in keys.all() if not k.erased]
    assert {k.kek_id for k in live_before} == {old.key_id}
    assert all(old.unwrap(k.wrapped, subject_id=k.subject_id) for k in live_before if k.wrapped)  # not vacuous

    index_version = store.keyring.index_key_id()

    done = rotate_cli(settings)

    assert done.returncode == 0, done.stderr
    assert f"re-wrapped {len(live_before)} keys" in done.stdout  # the people kept and the blind-index key
    new = LocalKek.load_or_create(settings.kek_path)
    assert new.key_id != old.key_id and new.key_id in done.stdout
    assert kek_finder(settings)(old.key_id) is None and KeyFiles(settings.kek_path).load(old.key_id) is None
    assert sorted(p.name for p in settings.kek_path.parent.iterdir()) == ["kek", f"kek.{new.key_id}"]
    with pytest.raises(CryptoError):  # the pre-erasure copy: the only KEK there is cannot open it
        new.unwrap(dumped.wrapped, subject_id=forgotten.annotator_id)
    live_after = [k for k in keys.all() if not k.erased]
    assert [k.subject_id for k in live_after] == [k.subject_id for k in live_before]
    for stored in live_after:
        assert stored.kek_id == new.key_id and stored.wrapped is not None
        with pytest.raises(CryptoError):
            old.unwrap(stored.wrapped, subject_id=stored.subject_id)
        with pytest.raises(CryptoError):
            Keyring(keys, old).data_key(stored.subject_id, create=False)

    with EventStore.open(settings) as fresh, psycopg.connect(settings.database_url) as conn:
        assert fresh.keyring.kek_id == new.key_id  # it found only the new KEK file
        assert fresh.keyring.index_key_id() == index_version  # the same blind-index key, re-wrapped
        streams = [r[0] for r in conn.execute("SELECT DISTINCT stream_id FROM evp_events ORDER BY 1").fetchall()]
        decoded = [event for stream in streams for event in fresh.read_stream(stream)]
        assert len(decoded) == conn.execute("SELECT count(*) FROM evp_events").fetchone()[0]  # type: ignore[index]
        names = {e.data["annotator_id"]: (e.data["name"], e.data["email"]) for e in decoded if "email" in e.data}
        assert names == {p.annotator_id: (p.name, p.email) for p in kept} | {forgotten.annotator_id: (REDACTED, REDACTED)}
        with pytest.raises(KeyErased):
            fresh.keyring.data_key(forgotten.annotator_id, create=True)
        # the blind-index key moved too: an email still finds its reservation
        indexes = {e.data["email_index"] for e in decoded if "email_index" in e.data}
        assert {blind_index(fresh.keyring, "email", p.email) for p in kept} <= indexes


def test_a_keyring_still_holding_the_old_kek_is_refused_naming_both_ids(store: EventStore, settings: Settings) -> None:
    first, second = make_people(random.Random(), 2)
    register(store, first)
    keys = PostgresKeyStore(settings.keyring_url)
    stale = Keyring(keys, kek_from_settings(settings))  # a keyring that cannot find other KEKs
    old_id = stale.kek_id

    done = rotate_cli(settings)  # another process rotates while this one runs with the old KEK

    assert done.returncode == 0, done.stderr
    new_id = LocalKek.load_or_create(settings.kek_path).key_id
    with pytest.raises(KekRetired) as caught:
        stale.data_key(second.annotator_id, create=True)
    assert old_id in str(caught.value) and new_id in str(caught.value)
    assert keys.get(second.annotator_id) is None  # nothing was wrapped under the retired KEK
    assert {k.kek_id for k in keys.all() if k.wrapped is not None} == {new_id}
    keys.close()


def test_a_running_store_follows_the_rotation_to_the_new_kek(store: EventStore, settings: Settings) -> None:
    first, second = make_people(random.Random(), 2)
    register(store, first)
    assert rotate_cli(settings).returncode == 0
    new_id = LocalKek.load_or_create(settings.kek_path).key_id
    store.append(second.stream_id, registered(second))  # the store's keyring finds the new KEK by id
    assert store.read_stream(second.stream_id)[0].data["email"] == second.email
    keys = PostgresKeyStore(settings.keyring_url)
    assert keys.get(second.annotator_id).kek_id == new_id  # type: ignore[union-attr]
    keys.close()


def test_a_rotation_writing_elsewhere_than_the_configured_key_file_is_refused(settings: Settings, tmp_path: Path) -> None:
    with EventStore.open(settings) as store:
        register(store, make_people(random.Random(), 1)[0])
    before = settings.kek_path.read_bytes()
    refused = run_cli(settings, "keys", "rotate", "--write-to", str(tmp_path / "other" / "kek"))
    assert refused.returncode == 1 and "is not the configured key file" in refused.stderr, refused.stderr
    assert settings.kek_path.read_bytes() == before and not (tmp_path / "other").exists()
