"""A snapshot as the log was: ``evp snapshot create --dataset NAME --as-of TIME | --position P``.

A snapshot cut live when the log ended at ledger position P and one cut later at P must be
the same rows (the same content hash); every re-read of the as-of snapshot (verify,
re-materializing missing shards) must skip what the cut skipped.
"""

from __future__ import annotations

import json

import pytest

from events.errors import NotFound
from events.event import Event
from events.settings import Settings
from events.store.client import EventStore
from tests.support.cli import evp
from tests.support.cuts import recorded_at, resend
from tests.support.examples import DIGITS, project
from tests.support.training import digits
from trainer.dataset import content_hash
from trainer.recipe import load_recipe
from trainer.runs import replay_run, train_snapshot
from trainer.snapshot import create_snapshot, load_dataset, load_manifest, load_table, snapshot_dir, verify_snapshot

pytestmark = pytest.mark.services

PROJECT = project(DIGITS)
DATASET = load_dataset(PROJECT, "digits")


def submit(store: EventStore, i: int, label: int) -> int:
    features = [float((i * 5 + k) % 13) for k in range(64)]
    return store.append(f"sample-{i}", Event("SampleSubmitted", {
        "sample_id": f"s{i:03d}", "annotator_id": "a1", "features": features, "label": label}, actor="a1")).positions[0]


def correct(store: EventStore, i: int, label: int) -> int:
    return store.append(f"sample-{i}", Event("LabelCorrected", {
        "sample_id": f"s{i:03d}", "annotator_id": "a2", "previous_label": 0, "label": label})).positions[0]


def retract(store: EventStore, i: int) -> int:
    return store.append(f"sample-{i}", Event("SampleRetracted", {
        "sample_id": f"s{i:03d}", "annotator_id": "a1", "reason": "blur"})).positions[0]


def later_changes(store: EventStore) -> None:
    """Events after the cut that change the rows the cut holds, and add others."""
    for i in range(0, 20, 3):
        correct(store, i, 9)
    retract(store, 1)
    for i in range(40, 45):
        submit(store, i, 4)
    store.flush()


def test_a_snapshot_as_of_a_position_is_the_live_snapshot_taken_then_and_verifies(
    store: EventStore, settings: Settings,
) -> None:
    for i in range(20):
        submit(store, i, i % 10)
    position = correct(store, 5, 1)
    store.flush()
    live = create_snapshot(store, DATASET)  # the log ends at `position` (its own event comes after)
    assert live.cut_position is None
    later_changes(store)

    past = create_snapshot(store, DATASET, position=position)
    assert past.content_hash == live.content_hash and past.row_count == live.row_count == 20
    assert past.cut_position == position and load_manifest(store, past.snapshot_id).cut_position == position
    assert json.loads((snapshot_dir(store, past.snapshot_id) / "manifest.json").read_text())["cut_position"] == position
    assert verify_snapshot(store, past.snapshot_id, PROJECT).content_hash == live.content_hash
    for shard in past.shards:  # re-materializing reads the ranges through the same cut
        (snapshot_dir(store, past.snapshot_id) / shard.name).unlink()
    assert content_hash(DATASET.identity(), load_table(store, past.snapshot_id, PROJECT)) == live.content_hash

    done = evp(settings, "snapshot", "create", "--dataset", "digits", "--as-of", recorded_at(store, position).isoformat(),
               "--json")
    assert done.code == 0, done.err
    by_time = json.loads(done.out)
    assert (by_time["content_hash"], by_time["cut_position"]) == (live.content_hash, position)
    done = evp(settings, "snapshot", "create", "--dataset", "digits", "--position", str(position))
    assert done.code == 0, done.err
    assert f"as of ledger position {position} (topic ends" in done.out and live.content_hash in done.out
    done = evp(settings, "snapshot", "verify", by_time["snapshot_id"])
    assert done.code == 0 and "verified" in done.out, done.err

    now = create_snapshot(store, DATASET)
    assert now.content_hash != live.content_hash and now.row_count == 24


def test_a_relay_re_send_below_the_end_is_not_in_the_as_of_snapshot(store: EventStore) -> None:
    first = submit(store, 1, 3)
    second = correct(store, 1, 5)
    correct(store, 1, 8)  # after the cut, on the topic before the re-send
    store.flush()
    resend(store, [first, second])  # a relay crashed before it recorded the first two
    past = create_snapshot(store, DATASET, position=second)
    table = load_table(store, past.snapshot_id)
    assert list(table.row_ids) == ["s001"] and int(table["label"][0]) == 5
    assert past.record_count == 2  # the two events up to the cut; re-sends and the later correction skipped
    assert verify_snapshot(store, past.snapshot_id, PROJECT).records_read == 2


def test_an_as_of_before_the_ledger_began_is_named(store: EventStore, settings: Settings) -> None:
    submit(store, 1, 1)
    store.flush()
    done = evp(settings, "snapshot", "create", "--dataset", "digits", "--as-of", "2001-01-01T00:00:00")
    assert done.code == 1 and "no event recorded at or before 2001-01-01T00:00:00+00:00" in done.err
    done = evp(settings, "snapshot", "create", "--dataset", "digits", "--as-of", "last week")
    assert done.code == 1 and "--as-of 'last week' is not an ISO 8601 time" in done.err
    with pytest.raises(NotFound, match="no ledger position -1"):
        create_snapshot(store, DATASET, position=-1)


def test_a_run_on_an_as_of_snapshot_replays_identically_from_the_re_read_log(store: EventStore) -> None:
    table = digits()
    positions = [store.append(f"sample-{i}", Event("SampleSubmitted", {
        "sample_id": table.row_ids[i], "annotator_id": "a1", "features": table["features"][i].tolist(),
        "label": int(table["label"][i])})).positions[0] for i in range(160)]
    store.flush()
    cut = positions[119]
    resend(store, positions[80:120])  # the cut's ends now reach past the 40 events after it
    past = create_snapshot(store, DATASET, position=cut)
    assert past.row_count == 120
    recipe = load_recipe(PROJECT, "mlp")
    run = train_snapshot(store, PROJECT, recipe, past.snapshot_id, recipe.parse_config(["epochs=2", "device=cpu"]))
    for shard in past.shards:  # the replay re-materializes the rows from Kafka, through the cut
        (snapshot_dir(store, past.snapshot_id) / shard.name).unlink()
    outcome = replay_run(store, PROJECT, run.run_id)
    assert outcome.identical, outcome.differences()
