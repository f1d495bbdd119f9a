"""Training runs as events: train from a snapshot, record what happened, replay to prove it.

A run record holds everything needed to repeat the run: the snapshot id (which pins the
data), the config, the software and device it ran on, and the sha256 of the weights. A
replay trains again from the same snapshot and config and compares the hashes; the replay is
itself recorded, pointing at the run it replayed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from events.store.client import EventStore
from events.errors import NotFound
from events.event import Event
from events.adapters.files import write_atomically
from events.ids import uuid7
from trainer.config import TrainConfig
from trainer.snapshot import load_examples
from trainer.training import TrainResult, train

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    snapshot_id: str
    config: TrainConfig
    environment: dict[str, object]
    device: str
    weights_sha256: str
    heldout_accuracy: float
    replay_of: str | None


@dataclass(frozen=True)
class ReplayOutcome:
    original: RunRecord
    replay: RunRecord

    @property
    def identical(self) -> bool:
        return self.original.weights_sha256 == self.replay.weights_sha256


def run_dir(store: EventStore, run_id: str) -> Path:
    return store.settings.runs_dir / run_id


def train_snapshot(
    store: EventStore, snapshot_id: str, config: TrainConfig, *, replay_of: str | None = None,
    progress: Progress | None = None, actor: str = "evp",
) -> RunRecord:
    """Train on a snapshot's verified shards, save the weights, and record the run as an event."""
    examples = load_examples(store, snapshot_id)
    run_id = f"run-{uuid7().hex[:12]}"
    checkpoint = run_dir(store, run_id) / "checkpoint.pt"
    result = train(examples, config, checkpoint_path=checkpoint if config.checkpoint_every else None, progress=progress)
    record = RunRecord(run_id, snapshot_id, config, result.environment, result.device, result.weights_sha256,
                       result.heldout_accuracy, replay_of)
    _save_weights(store, record, result)
    store.append(f"training-{run_id}", Event("TrainingRunRecorded", {
        "run_id": run_id, "snapshot_id": snapshot_id, "config_json": config.to_json(),
        "environment_json": json.dumps(result.environment, sort_keys=True, default=str), "device": result.device,
        "weights_sha256": result.weights_sha256, "heldout_accuracy": result.heldout_accuracy, "replay_of": replay_of,
    }, actor=actor))
    store.flush()
    return record


def _save_weights(store: EventStore, record: RunRecord, result: TrainResult) -> None:
    write_atomically(run_dir(store, record.run_id) / "weights.pt", lambda out: torch.save(result.state_dict, out))


def load_run(store: EventStore, run_id: str) -> RunRecord:
    try:
        events = store.read_stream(f"training-{run_id}", decrypt=False)
    except NotFound as err:
        raise NotFound(f"training run {run_id!r} was never recorded") from err
    data = events[0].data
    return RunRecord(
        run_id=data["run_id"], snapshot_id=data["snapshot_id"], config=TrainConfig.from_json(data["config_json"]),
        environment=json.loads(data["environment_json"]), device=data["device"],
        weights_sha256=data["weights_sha256"], heldout_accuracy=float(data["heldout_accuracy"]),
        replay_of=data.get("replay_of"),
    )


def replay_run(store: EventStore, run_id: str, *, progress: Progress | None = None) -> ReplayOutcome:
    """Train again from the recorded snapshot and config; compare the weights' hashes."""
    original = load_run(store, run_id)
    replay = train_snapshot(store, original.snapshot_id, original.config, replay_of=run_id, progress=progress)
    return ReplayOutcome(original, replay)


def runs_of_snapshot(store: EventStore, snapshot_id: str) -> list[RunRecord]:
    """Which models saw this snapshot (and so every sample in it)."""
    runs = [load_run(store, s.removeprefix("training-")) for s in store.ledger.streams_with_prefix("training-")]
    return [r for r in runs if r.snapshot_id == snapshot_id]
