"""Forgetting a subject: crypto-shredding, checked from the outside.

After ``forget`` the subject's personal data reads as ``[erased]`` wherever it was copied,
no fresh key can bring it back, the erasure event itself carries nothing personal, other
subjects are untouched, and models can still be trained from snapshots cut before.
Another process's keyring stops using the key within the documented bound; a look-alike
subject id (whitespace, control characters, not NFC) never gets a key of its own, and one
stored before that rule is forgotten with the subject it stands for.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from events.store.client import EventStore
from events.errors import InvalidEvent, KeyErased
from events.ops.forget import erasure_scope, forget_subject
from events.privacy import personal
from events.privacy.keyring import InvalidSubject, Keyring
from events.privacy.personal import REDACTED
from events.settings import Settings
from projections.runner import ProjectionRunner
from projections.declarations import load_view
from tests.support.examples import DIGITS, project
from tests.support.plaintext import (
    Person,
    PlaintextScanner,
    kafka_log_dir,
    make_people,
    pg_dump,
    read_files,
    register,
    registered,
    run_cli,
    snapshot_files,
    submit,
    topic_files,
    with_bytea_decoded,
)
from trainer.recipe import load_recipe
from trainer.runs import train_snapshot
from trainer.snapshot import create_snapshot, load_dataset, verify_snapshot

pytestmark = pytest.mark.services

SAMPLES_EACH = 15


@dataclass(frozen=True)
class Seeded:
    people: tuple[Person, ...]
    sample_ids: dict[str, tuple[str, ...]]  #: annotator id -> their samples
    snapshot_id: str


def seed(store: EventStore, settings: Settings) -> Seeded:
    """Three annotators with samples, projected and snapshotted."""
    rng = random.Random()
    people = tuple(make_people(rng, 3))
    sample_ids = {p.annotator_id: tuple(f"{p.annotator_id}-s{i}" for i in range(SAMPLES_EACH)) for p in people}
    for person in people:
        register(store, person)
        submit(store, person, sample_ids[person.annotator_id], "digits")
    store.flush()
    with ProjectionRunner(settings, load_view(project(DIGITS), "samples")) as runner:
        runner.catch_up()
    return Seeded(people, sample_ids, create_snapshot(store, load_dataset(project(DIGITS), "digits")).snapshot_id)


def durable_state(conn: psycopg.Connection[Any]) -> tuple[object, ...]:
    """Everything a dry run must leave alone: keys, reservations, the ledger's end, the streams."""
    return (
        conn.execute("SELECT subject_id, kek_id, wrapped_key, erased_at FROM evp_keyring.evp_data_keys ORDER BY subject_id").fetchall(),
        conn.execute("SELECT scope, value, stream_id FROM evp_reservations ORDER BY value").fetchall(),
        conn.execute("SELECT max(position) FROM evp_events").fetchone(),
        conn.execute("SELECT stream_id, version FROM evp_streams ORDER BY stream_id").fetchall(),
    )


def opened(store: EventStore, person: Person) -> tuple[str, str]:
    data = store.read_stream(person.stream_id)[0].data
    return data["name"], data["email"]


def test_dry_run_lists_what_the_erasure_touches_and_changes_nothing(store: EventStore, settings: Settings) -> None:
    world = seed(store, settings)
    target = world.people[0]
    expected_streams = {target.stream_id} | {f"sample-{s}" for s in world.sample_ids[target.annotator_id]}
    with psycopg.connect(settings.database_url) as conn:
        before = durable_state(conn)

    report = forget_subject(store, target.annotator_id, reason="request 1", dry_run=True)
    cli = run_cli(settings, "forget", "--dry-run", target.annotator_id)

    assert report.dry_run and not report.key_destroyed
    assert set(report.streams) == expected_streams
    assert report.events == 1 + SAMPLES_EACH
    assert report.reservations == 1  # the email's blind index
    assert report.snapshots == (world.snapshot_id,)
    assert cli.returncode == 0, cli.stderr
    assert f"{report.events} events in {len(expected_streams)} streams" in cli.stdout
    assert f"snapshot {world.snapshot_id}" in cli.stdout
    assert all(f"stream   {s}" in cli.stdout for s in expected_streams)
    with psycopg.connect(settings.database_url) as conn:
        assert durable_state(conn) == before
    with EventStore.open(settings) as fresh:
        assert opened(fresh, target) == (target.name, target.email)


def test_forgetting_shreds_the_subject_and_keeps_everyone_else(store: EventStore, settings: Settings) -> None:
    world = seed(store, settings)
    by_cli, by_api, kept = world.people

    cli = run_cli(settings, "forget", "--reason", "request 42", by_cli.annotator_id)
    report = forget_subject(store, by_api.annotator_id, reason="request 43")

    assert cli.returncode == 0, cli.stderr
    assert "data key destroyed" in cli.stdout
    assert report.key_destroyed and not report.dry_run and report.snapshots == (world.snapshot_id,)
    with EventStore.open(settings) as fresh:  # another process forgot by_cli: no stale cached key here
        for gone in (by_cli, by_api):
            assert opened(fresh, gone) == (REDACTED, REDACTED)
            for sample_id in world.sample_ids[gone.annotator_id][:3]:  # non-personal events stay readable
                assert fresh.read_stream(f"sample-{sample_id}")[0].data["sample_id"] == sample_id
            with pytest.raises(KeyErased):
                fresh.keyring.data_key(gone.annotator_id, create=True)
            with pytest.raises(KeyErased):  # and no new personal data is accepted for them
                fresh.append(f"{gone.stream_id}-again", registered(gone))
        assert opened(fresh, kept) == (kept.name, kept.email)
        assert fresh.keyring.data_key(kept.annotator_id, create=False)

        erasure = fresh.read_stream(f"erasure-{by_cli.annotator_id}", decrypt=False)
        assert [e.type.rsplit(".", 1)[-1] for e in erasure] == ["SubjectForgotten"]
        assert dict(erasure[0].data) == {"subject_id": by_cli.annotator_id, "reason": "request 42"}
        assert not PlaintextScanner(by_cli.personal).find(erasure[0].record.value)

        with psycopg.connect(settings.database_url) as conn:
            held = conn.execute(
                "SELECT count(*) FROM evp_reservations WHERE stream_id = ANY(%s)", ([by_cli.stream_id, by_api.stream_id],)
            ).fetchone()
        assert held == (0,)  # the email blind indexes are released too
        assert erasure_scope(fresh, by_cli.annotator_id).snapshots == (world.snapshot_id,)  # audit still answers

        with ProjectionRunner(settings, load_view(project(DIGITS), "samples")) as runner:
            assert runner.catch_up().dead_lettered == 0

        # a model can still be trained from the snapshot cut before the erasure
        assert verify_snapshot(fresh, world.snapshot_id, project(DIGITS)).shards_checked > 0
        recipe = load_recipe(project(DIGITS), "mlp")
        run = train_snapshot(fresh, project(DIGITS), recipe, world.snapshot_id,
                             recipe.parse_config(["epochs=1", "device=cpu"]))
        assert run.snapshot_id == world.snapshot_id and len(run.weights_sha256) == 64

    _assert_no_plaintext_anywhere(settings, world.people)


def _assert_no_plaintext_anywhere(settings: Settings, people: tuple[Person, ...]) -> None:
    scanner = PlaintextScanner(v for p in people for v in p.personal)
    dump = pg_dump(settings.database_url)
    sources = {"pg_dump": with_bytea_decoded(dump), **read_files(snapshot_files(settings))}
    log_dir = kafka_log_dir()
    if log_dir is not None:
        sources.update(read_files(topic_files(log_dir, settings)))
    assert not scanner.scan(sources)


REPO = Path(__file__).resolve().parents[2]
#: A second process: caches the subject's key, then uses it every 50 ms until it is refused.
_HOLDER = """
import sys, time
from events.errors import KeyErased
from events.privacy.kek import kek_from_settings
from events.privacy.keyring import Keyring, PostgresKeyStore
from events.settings import Settings
settings = Settings.from_env()
keyring = Keyring(PostgresKeyStore(settings.database_url), kek_from_settings(settings))
keyring.data_key(sys.argv[1], create=False)
print("ready", flush=True)
while True:
    try:
        keyring.data_key(sys.argv[1], create=False)
        print("used", time.time(), flush=True)
    except KeyErased:
        print("erased", time.time(), flush=True)
        break
    time.sleep(0.05)
"""


def test_another_process_stops_using_a_forgotten_key_within_the_documented_bound(
    store: EventStore, settings: Settings,
) -> None:
    (person,) = make_people(random.Random(), 1)
    register(store, person)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVP_")}
    env.update(settings.to_env(), PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, person.annotator_id], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        forgotten_at = time.time()
        forget_subject(store, person.annotator_id, reason="request")
        out, err = holder.communicate(timeout=Keyring.DEFAULT_CACHE_SECONDS + 20)
    finally:
        holder.kill()
    lines = [line.split() for line in out.splitlines() if len(line.split()) == 2]
    assert lines and lines[-1][0] == "erased", out + err
    used_after = [float(t) for word, t in lines if word == "used" and float(t) > forgotten_at]
    assert used_after  # not vacuous: the other process did go on with its cached copy for a while
    assert float(lines[-1][1]) - forgotten_at <= Keyring.DEFAULT_CACHE_SECONDS + 1.0


@pytest.mark.parametrize("lookalike", ["{id} ", " {id}", "{id}\t", "{id}\u200b", "{id}\x1b", "{id}e\u0301"])
def test_a_look_alike_subject_id_is_refused_naming_the_subject_field(store: EventStore, lookalike: str) -> None:
    (person,) = make_people(random.Random(), 1)
    register(store, person)
    twin = replace(person, annotator_id=lookalike.format(id=person.annotator_id))
    with pytest.raises(InvalidEvent) as caught:
        store.append(f"{person.stream_id}-twin", registered(twin))
    assert caught.value.field == "annotator_id" and repr(twin.annotator_id) in str(caught.value)
    assert store.keyring.lookalikes(person.annotator_id) == []  # no key was made for it


def test_forgetting_a_subject_forgets_the_look_alike_ids_stored_before_the_rule(
    store: EventStore, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    person, other = make_people(random.Random(), 2)
    twin = replace(person, annotator_id=person.annotator_id + " ", name=person.name + " II",
                   email="twin." + person.email)
    register(store, person)
    register(store, other)
    with monkeypatch.context() as old_sdk:  # an SDK from before subject ids were checked
        old_sdk.setattr(personal, "subject_problem", lambda subject_id: None)
        old_sdk.setattr("events.privacy.keyring.subject_problem", lambda subject_id: None)
        store.append(f"{person.stream_id}-twin", registered(twin))
    assert store.read_stream(f"{person.stream_id}-twin")[0].data["name"] == twin.name

    with pytest.raises(InvalidSubject, match=repr(person.annotator_id)):
        forget_subject(store, twin.annotator_id, reason="request")  # names the id to forget instead
    report = forget_subject(store, person.annotator_id, reason="request")

    assert report.lookalikes == (twin.annotator_id,) and report.key_destroyed
    with EventStore.open(settings) as fresh:
        assert fresh.read_stream(f"{person.stream_id}-twin")[0].data["name"] == REDACTED
        assert opened(fresh, person) == (REDACTED, REDACTED)
        assert opened(fresh, other) == (other.name, other.email)
        erased = [e.data["subject_id"] for e in fresh.read_stream(f"erasure-{person.annotator_id}", decrypt=False)]
        assert erased == [person.annotator_id, twin.annotator_id]  # projections redact both
        for subject in (person.annotator_id, twin.annotator_id):
            with pytest.raises(KeyErased):
                fresh.keyring.data_key(subject, create=False)
