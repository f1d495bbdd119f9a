"""``evp keys rotate`` SIGKILLed at every step, then run again: no data key is ever lost.

Each test kills the real command (``python -m events.cli keys rotate``, a subprocess) at one
checkpoint of :data:`events.cli.keys.STEPS` (``EVP_TEST_KILL_AT``), checks right after the
kill that every live key still opens with a key file on disk, runs the command again, and
checks that it finished *that* rotation — same new key, no third one — that a fresh process
holding only the configured key file decrypts every event exactly as before, and that the
old KEK is retired: its file gone, and it opens no stored key.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from events.cli.keys import STEPS
from events.errors import CryptoError
from events.ops.forget import forget_subject
from events.privacy.kek import KeyFiles, LocalKek, kek_finder
from events.privacy.keyring import PostgresKeyStore
from events.settings import Settings
from events.store.client import EventStore
from tests.support.plaintext import make_people, register, submit

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[2]


def rotate_cli(settings: Settings, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m events.cli keys rotate`` from this checkout, with exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")}
    env.update(settings.to_env(), PYTHONPATH=str(REPO))
    if kill_at is not None:
        env["EVP_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "events.cli", "keys", "rotate", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def everything(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Every stream's events, decoded and decrypted by a fresh process's keyring."""
    with EventStore.open(settings) as fresh, psycopg.connect(settings.database_url) as conn:
        streams = [r[0] for r in conn.execute("SELECT DISTINCT stream_id FROM evp_events ORDER BY 1").fetchall()]
        return {s: [dict(e.data) for e in fresh.read_stream(s)] for s in streams}


def assert_every_live_key_opens(settings: Settings) -> set[str]:
    """Every live wrapped key unwraps with a KEK found on disk; returns the KEK ids in use."""
    find = kek_finder(settings)
    keys = PostgresKeyStore(settings.keyring_url)
    try:
        live = [k for k in keys.all() if k.wrapped is not None]
        assert live
        for stored in live:
            kek = find(stored.kek_id)
            assert kek is not None, f"key of {stored.subject_id!r} is wrapped by {stored.kek_id}, which no file holds"
            assert stored.wrapped is not None and len(kek.unwrap(stored.wrapped, subject_id=stored.subject_id)) == 32
        return {k.kek_id for k in live}
    finally:
        keys.close()


@pytest.fixture
def world(store: EventStore, settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Three people (one forgotten) with a sample each: five live keys with the blind-index key."""
    people = make_people(random.Random(), 4)
    for person in people:
        register(store, person)
        submit(store, person, [f"{person.annotator_id}-1"], "digits")
    forget_subject(store, people[0].annotator_id, reason="request")
    store.flush()
    return everything(settings)


@pytest.mark.parametrize("kills", [(step,) for step in STEPS] + [("rewrap-batch", "verified", "switched")],
                         ids=lambda kills: "+".join(kills))
def test_a_rotation_killed_at_any_step_finishes_when_run_again(
    world: dict[str, list[dict[str, Any]]], settings: Settings, kills: tuple[str, ...],
) -> None:
    old = LocalKek.load_or_create(settings.kek_path)
    keys = PostgresKeyStore(settings.keyring_url)
    new_ids: set[str] = set()
    for step in kills:
        killed = rotate_cli(settings, "--batch-size", "2", kill_at=step)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        in_use = assert_every_live_key_opens(settings)  # right after the kill: nothing lost
        state = keys.kek_state()
        if state.rotating_to is not None:
            new_ids.add(state.rotating_to)
        assert in_use <= {old.key_id, *new_ids}

    done = rotate_cli(settings, "--batch-size", "2")

    assert done.returncode == 0, done.stderr
    state = keys.kek_state()
    new = LocalKek.load_or_create(settings.kek_path)
    assert state.current == new.key_id != old.key_id
    assert state.rotating_to is None and state.retired == (old.key_id,)
    assert new_ids <= {new.key_id}  # the run after the kill finished that rotation: never another key
    assert f"to {new.key_id}" in done.stdout and "re-wrapped 4 keys" in done.stdout
    assert assert_every_live_key_opens(settings) == {new.key_id}
    assert everything(settings) == world  # bit for bit, every event, the forgotten one still redacted
    files = KeyFiles(settings.kek_path)
    assert files.load(old.key_id) is None  # retired: no file holds the old KEK
    assert sorted(p.name for p in settings.kek_path.parent.iterdir() if p.name.startswith("kek")) == \
        sorted(["kek", f"kek.{new.key_id}"])
    for stored in keys.all():
        if stored.wrapped is not None:
            with pytest.raises(CryptoError):
                old.unwrap(stored.wrapped, subject_id=stored.subject_id)
    keys.close()


def test_a_killed_first_step_reuses_the_key_it_wrote(world: dict[str, list[dict[str, Any]]],
                                                      settings: Settings) -> None:
    old = LocalKek.load_or_create(settings.kek_path)
    killed = rotate_cli(settings, kill_at="key-written")
    assert killed.returncode == -signal.SIGKILL
    written = KeyFiles(settings.kek_path).unused({old.key_id})
    assert len(written) == 1  # the new key is on disk, the store does not know it yet

    done = rotate_cli(settings)

    assert done.returncode == 0, done.stderr
    assert LocalKek.load_or_create(settings.kek_path).key_id == written[0].key_id
    assert everything(settings) == world


def test_a_rotation_whose_new_key_file_vanished_before_any_key_moved_rolls_back(
    world: dict[str, list[dict[str, Any]]], settings: Settings,
) -> None:
    old = LocalKek.load_or_create(settings.kek_path)
    assert rotate_cli(settings, kill_at="recorded").returncode == -signal.SIGKILL
    keys = PostgresKeyStore(settings.keyring_url)
    pending = keys.kek_state().rotating_to
    assert pending is not None
    KeyFiles(settings.kek_path).path_of(pending).unlink()  # an operator "cleaned up"

    rolled = rotate_cli(settings)

    assert rolled.returncode == 0, rolled.stderr
    assert "rolled back" in rolled.stdout
    assert keys.kek_state().current == old.key_id and keys.kek_state().rotating_to is None
    assert everything(settings) == world
    assert rotate_cli(settings).returncode == 0  # and a rotation can start afresh
    assert assert_every_live_key_opens(settings) == {LocalKek.load_or_create(settings.kek_path).key_id}
    keys.close()
