"""A recorded training run replays to identical weights; runs are events an audit can find."""

from __future__ import annotations

import pytest
from sklearn.datasets import load_digits

from events.store.client import EventStore
from events.event import Event
from trainer.config import TrainConfig
from trainer.runs import load_run, replay_run, runs_of_snapshot, train_snapshot
from trainer.snapshot import create_snapshot

pytestmark = pytest.mark.services


def test_replay_gives_identical_weights_and_is_recorded(store: EventStore) -> None:
    digits = load_digits()
    for i in range(300):
        store.append(f"sample-{i}", Event("SampleSubmitted", {
            "sample_id": f"d{i:04d}", "annotator_id": "a1", "features": digits.data[i].tolist(),
            "label": int(digits.target[i])}))
    manifest = create_snapshot(store)
    config = TrainConfig(epochs=3, device="cpu")
    run = train_snapshot(store, manifest.snapshot_id, config)
    outcome = replay_run(store, run.run_id)

    assert outcome.identical
    assert outcome.replay.run_id != run.run_id and outcome.replay.replay_of == run.run_id
    assert load_run(store, run.run_id) == run
    assert {r.run_id for r in runs_of_snapshot(store, manifest.snapshot_id)} == {run.run_id, outcome.replay.run_id}
    # a different seed is a different model: the comparison is not trivially true
    other = train_snapshot(store, manifest.snapshot_id, TrainConfig(epochs=3, device="cpu", seed=99))
    assert other.weights_sha256 != run.weights_sha256
