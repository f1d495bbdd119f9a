"""Training runs as events: train a recipe on a snapshot, record what happened, replay to prove it.

Training (:func:`train_snapshot`):

1. read the snapshot's shards, verified against their hashes (re-materialized from Kafka
   when missing; a snapshot an erasure purged is refused, :class:`~events.errors.SnapshotPurged`);
2. train the recipe with its config (:func:`trainer.training.train`);
3. save the weights beside the run (``<runs>/<run id>/weights.pt``);
4. record a ``TrainingRunRecorded`` event in stream ``training-<run id>``, appended as
   ``settings.actor``: snapshot, recipe and dataset (``module:attribute``), config,
   environment, device, weights hash, held-out metrics and the code digest (per module
   holding the recipe or the dataset class, the sha256 of its source file).

Replaying (:func:`replay_run`):

1. load the run record and the recipe it names; refuse a run whose snapshot an erasure
   purged (:class:`~events.errors.SnapshotPurged`, naming the run, the snapshot and the
   erasure: its rows are gone, so the run cannot be replayed; retrain on a new snapshot);
2. compare the recorded code digest with the modules' current source; refuse a difference
   (a ReplayRefused naming each changed module) unless ``allow_code_change``;
3. train again from the same snapshot and config, record the replay (``replay_of``), and
   report what differs: weights, metrics, environment, code;
4. when the weights differ, name which recorded difference explains it, most likely first
   (:meth:`ReplayOutcome.causes`, :mod:`trainer.diagnosis`), or that none does: a broken
   exactness promise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from events.adapters.files import write_atomically
from events.errors import ConfigurationError, EvpError, NotFound
from events.event import Event
from events.ids import uuid7
from events.project import Project
from events.store.client import EventStore
from trainer.config import TrainConfig
from trainer.diagnosis import Cause, diagnose, explain
from trainer.recipe import Recipe, code_digest, load_recipe, module_digest
from trainer.purge import refuse_purged
from trainer.launch import Job, run_job
from trainer.snapshot import declaration_of, load_dataset, shards_ready, snapshot_dir
from trainer.training import TrainResult

Progress = Callable[[int, int], None]
#: A run id, as :func:`train_snapshot` makes them (``run-`` and 12 hex digits) or close to
#: it: nothing that could leave the runs folder.
RUN_ID = re.compile(r"run-[0-9a-z]{1,40}")


def check_run_id(run_id: object) -> str:
    """``run_id`` if it matches :data:`RUN_ID`; ConfigurationError naming it otherwise."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise ConfigurationError(
            f"run id {run_id!r} is not valid: it must be 'run-' followed by 1 to 40 lower-case letters or digits "
            "(as evp makes them, e.g. run-0192f3a4b5c6)"
        )
    return run_id


class ReplayRefused(EvpError):
    """The code a run was recorded with has changed; a replay would not test the same thing."""

    def __init__(self, run_id: str, modules: dict[str, tuple[str, str | None]]) -> None:
        self.run_id, self.modules = run_id, modules
        shown = ", ".join(f"{name} (recorded {old[:12]}…, now {'missing' if new is None else new[:12] + '…'})"
                          for name, (old, new) in modules.items())
        super().__init__(f"run {run_id}: code changed since it was recorded: {shown}; "
                         "pass --allow-code-change to replay anyway")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    snapshot_id: str
    recipe: str
    dataset: str
    config_json: str
    environment: dict[str, Any]
    device: str
    weights_sha256: str
    metrics: dict[str, float]
    code_digest: dict[str, str]
    replay_of: str | None

    def to_event(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "snapshot_id": self.snapshot_id, "recipe": self.recipe, "dataset": self.dataset,
            "config_json": self.config_json, "environment_json": json.dumps(self.environment, sort_keys=True,
                                                                             default=str),
            "device": self.device, "weights_sha256": self.weights_sha256, "metrics": dict(self.metrics),
            "code_digest": dict(self.code_digest), "replay_of": self.replay_of,
        }

    @classmethod
    def from_event(cls, data: dict[str, Any]) -> RunRecord:
        return cls(
            run_id=check_run_id(data["run_id"]), snapshot_id=str(data["snapshot_id"]), recipe=str(data["recipe"]),
            dataset=str(data["dataset"]), config_json=str(data["config_json"]),
            environment=json.loads(data["environment_json"]), device=str(data["device"]),
            weights_sha256=str(data["weights_sha256"]),
            metrics={str(k): float(v) for k, v in sorted(data["metrics"].items())},
            code_digest={str(k): str(v) for k, v in sorted(data["code_digest"].items())},
            replay_of=data.get("replay_of"),
        )


@dataclass(frozen=True)
class ReplayOutcome:
    original: RunRecord
    replay: RunRecord

    @property
    def verdict(self) -> str:
        return "identical" if self.identical else "DIFFERENT"

    @property
    def identical(self) -> bool:
        return self.original.weights_sha256 == self.replay.weights_sha256

    def differences(self) -> list[str]:
        """What differs between the two runs, one line each; empty when everything agrees."""
        lines: list[str] = []
        a, b = self.original, self.replay
        if a.weights_sha256 != b.weights_sha256:
            lines.append(f"weights sha256: {a.weights_sha256[:16]}… vs {b.weights_sha256[:16]}…")
        for name in sorted(set(a.metrics) | set(b.metrics)):
            if not _same_number(a.metrics.get(name), b.metrics.get(name)):
                lines.append(f"metric {name}: {a.metrics.get(name)!r} vs {b.metrics.get(name)!r}")
        for name in sorted(set(a.code_digest) | set(b.code_digest)):
            if a.code_digest.get(name) != b.code_digest.get(name):
                lines.append(f"code of module {name} changed")
        for key in sorted(set(a.environment) | set(b.environment)):
            if a.environment.get(key) != b.environment.get(key):
                lines.append(f"environment {key}: {a.environment.get(key)!r} vs {b.environment.get(key)!r}")
        return lines

    def causes(self) -> list[Cause]:
        """Why the weights differ, most likely cause first (:func:`trainer.diagnosis.diagnose`); empty when identical."""
        if self.identical:
            return []
        a, b = self.original, self.replay
        return diagnose(a.environment, b.environment, config_then=a.config_json, config_now=b.config_json,
                        code_then=a.code_digest, code_now=b.code_digest)

    def explanation(self) -> list[str]:
        """:meth:`causes` as lines, or the broken-promise line when none explains differing weights."""
        return [] if self.identical else explain(self.causes())


def _same_number(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def run_dir(store: EventStore, run_id: str) -> Path:
    return store.settings.runs_dir / check_run_id(run_id)


def train_snapshot(
    store: EventStore, project: Project, recipe: Recipe[Any], snapshot_id: str, config: TrainConfig, *,
    replay_of: str | None = None, progress: Progress | None = None, nproc: int = 1, workers: int = 0,
) -> RunRecord:
    """Train ``recipe`` on a snapshot and record the run; see the module docstring.

    The rows stream from the snapshot's verified shards (:mod:`trainer.loader`; ``workers``
    processes gather batches ahead); ``nproc`` > 1 trains data-parallel on that many
    processes (:mod:`trainer.launch`), whose world size and backend the run records.
    """
    if not isinstance(config, recipe.config):
        raise ConfigurationError(f"config is a {type(config).__name__}, recipe {type(recipe).__qualname__} takes "
                        f"{recipe.config.__name__}")
    manifest, folder = shards_ready(store, snapshot_id, project)
    dataset = load_dataset(project, manifest.declaration)
    run_id = f"run-{uuid7().hex[:12]}"
    checkpoint = run_dir(store, run_id) / "checkpoint.pt"
    job = Job(project.root, declaration_of(type(recipe)), config.to_json(), folder, tuple(manifest.shards),
              tuple(manifest.columns), f"snapshot {snapshot_id}",
              checkpoint=checkpoint if config.checkpoint_every else None, workers=workers)
    result = run_job(job, nproc, progress=progress)
    record = RunRecord(
        run_id=run_id, snapshot_id=snapshot_id, recipe=declaration_of(type(recipe)),
        dataset=manifest.declaration, config_json=config.to_json(), environment=result.environment,
        device=result.device, weights_sha256=result.weights_sha256, metrics=result.metrics,
        code_digest=code_digest(type(recipe), type(dataset)), replay_of=replay_of,
    )
    _save_weights(store, record, result)
    store.append(f"training-{run_id}", Event("TrainingRunRecorded", record.to_event(), actor=store.settings.actor))
    store.flush()
    return record


def _save_weights(store: EventStore, record: RunRecord, result: TrainResult) -> None:
    write_atomically(run_dir(store, record.run_id) / "weights.pt", lambda out: torch.save(result.state_dict, out))


def load_run(store: EventStore, run_id: str) -> RunRecord:
    check_run_id(run_id)
    try:
        events = store.read_stream(f"training-{run_id}", decrypt=False)
    except NotFound as err:
        raise NotFound(f"training run {run_id!r} was never recorded") from err
    return RunRecord.from_event(dict(events[0].data))


def changed_code(record: RunRecord) -> dict[str, tuple[str, str | None]]:
    """Modules whose source differs from the recorded digest: ``{module: (recorded, now or None)}``."""
    changed: dict[str, tuple[str, str | None]] = {}
    for module, recorded in record.code_digest.items():
        current = module_digest(module)
        if current != recorded:
            changed[module] = (recorded, current)
    return changed


def replay_run(
    store: EventStore, project: Project, run_id: str, *, allow_code_change: bool = False,
    progress: Progress | None = None,
) -> ReplayOutcome:
    """Train again from the recorded snapshot, recipe and config; see the module docstring."""
    original = load_run(store, run_id)
    refuse_purged(snapshot_dir(store, original.snapshot_id), f"run {run_id} cannot be replayed")
    changed = changed_code(original)
    if changed and not allow_code_change:
        raise ReplayRefused(run_id, changed)
    recipe = load_recipe(project, original.recipe)
    config = recipe.config_from_json(original.config_json)
    replay = train_snapshot(store, project, recipe, original.snapshot_id, config, replay_of=run_id,
                            progress=progress, nproc=int(original.environment.get("world_size", 1)))
    return ReplayOutcome(original, replay)


def runs_of_snapshot(store: EventStore, snapshot_id: str) -> list[RunRecord]:
    """Which models saw this snapshot (and so every row in it)."""
    runs = [load_run(store, s.removeprefix("training-")) for s in store.ledger.streams_with_prefix("training-")]
    return [r for r in runs if r.snapshot_id == snapshot_id]
