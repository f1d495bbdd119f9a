"""Data-parallel training on the CPU with gloo: two ranks, exact across runs and across a resume.

Each run starts two fresh processes (spawned), so the cases share runs where they can.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from events.errors import ConfigurationError
from tests.support.examples import DIGITS, project
from tests.support.training import DIGIT_COLUMNS, digits, mlp
from trainer.launch import Job, run_job
from trainer.shards import write_shards
from trainer.training import TrainResult, train

CONFIG = dataclasses.replace(mlp().default_config(), epochs=2, hidden=16, batch_size=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Job:
    folder = tmp_path_factory.mktemp("shards")
    infos = tuple(write_shards(digits(), folder, rows_per_shard=256))
    return Job(project(DIGITS).root, "mlp", CONFIG.to_json(), folder, infos, DIGIT_COLUMNS, "snapshot test")


@pytest.fixture(scope="module")
def straight(shards: Job) -> TrainResult:
    return run_job(shards, nproc=2)


def test_two_ranks_give_identical_weights_run_after_run(shards: Job, straight: TrainResult) -> None:
    again = run_job(shards, nproc=2)
    assert again.weights_sha256 == straight.weights_sha256 and again.metrics == straight.metrics
    assert straight.environment["world_size"] == 2 and straight.environment["backend"] == "gloo"
    train_rows = len(digits().split(CONFIG.holdout_percent)[0])
    assert straight.finished and straight.steps == CONFIG.epochs * (train_rows // CONFIG.batch_size)  # no partial batch
    # one process on the same rows is another computation (its reductions sum in another order)
    alone = train(mlp(), digits(), CONFIG)
    assert alone.environment["world_size"] == 1


def test_a_resume_at_a_random_step_equals_no_resume(shards: Job, straight: TrainResult, tmp_path: Path) -> None:
    stop = random.randint(1, straight.steps - 1)
    checkpoint = tmp_path / "run.pt"
    interrupted = run_job(dataclasses.replace(shards, checkpoint=checkpoint, stop_after_steps=stop), nproc=2)
    assert not interrupted.finished and interrupted.steps == stop
    resumed = run_job(dataclasses.replace(shards, checkpoint=checkpoint, resume=True), nproc=2)
    assert resumed.finished and resumed.weights_sha256 == straight.weights_sha256, f"resumed at step {stop}"
    # the same checkpoint under another world size is refused, naming both sizes
    with pytest.raises(ConfigurationError, match=r"written by 2 process\(es\); resuming it with 1 is refused"):
        run_job(dataclasses.replace(shards, checkpoint=checkpoint, resume=True), nproc=1)


def test_a_rank_that_fails_fails_the_job_naming_the_rank_and_why(shards: Job, tmp_path: Path) -> None:
    import shutil

    from events.errors import EvpError

    folder = tmp_path / "damaged"
    shutil.copytree(shards.folder, folder)
    victim = folder / shards.shards[2].name
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(EvpError, match=rf"training on 2 processes failed \(rank \d exited with 1.*shard "
                                       rf"{shards.shards[2].name} has sha256"):
        run_job(dataclasses.replace(shards, folder=folder), nproc=2)
