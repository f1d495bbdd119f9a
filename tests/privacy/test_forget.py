"""Forgetting a subject: crypto-shredding, checked from the outside.

After ``forget`` the subject's personal data reads as ``[erased]`` wherever it was copied,
no fresh key can bring it back, the erasure event itself carries nothing personal, other
subjects are untouched, and models can still be trained from snapshots cut before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from events.store.client import EventStore
from events.errors import KeyErased
from events.ops.forget import erasure_scope, forget_subject
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
        conn.execute("SELECT subject_id, kek_id, wrapped_key, erased_at FROM evp_data_keys ORDER BY subject_id").fetchall(),
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
