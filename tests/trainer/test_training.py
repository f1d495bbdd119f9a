"""Deterministic training on the real digits: same inputs, same weights, bit for bit.

Determinism tests train for two epochs (46 steps); one test trains the default config to
measure accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from events.errors import ConfigurationError, InvalidDataset
from tests.trainer import digits
from trainer.checkpoint import Checkpoint
from trainer.config import TrainConfig
from trainer.data import EpochSampler, Examples, holdout_bucket
from trainer.model import build_model, weights_sha256
from trainer.training import TrainResult, train

SHORT = TrainConfig(epochs=2)
TRAIN_ROWS = 1414  # of 1,797: the other 383 are held out by the hash of their id
STEPS_PER_EPOCH = math.ceil(TRAIN_ROWS / SHORT.batch_size)  # 23
SHORT_STEPS = 2 * STEPS_PER_EPOCH
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def uninterrupted(config: TrainConfig = SHORT) -> TrainResult:
    return train(digits(), config)


def assert_same_weights(left: TrainResult, right: TrainResult) -> None:
    assert left.weights_sha256 == right.weights_sha256
    assert left.state_dict.keys() == right.state_dict.keys()
    for name, tensor in left.state_dict.items():
        assert torch.equal(tensor, right.state_dict[name]), name


# --- determinism ------------------------------------------------------------------------


def test_same_examples_and_config_give_identical_weights() -> None:
    first, second = train(digits(), SHORT), train(digits(), SHORT)
    assert_same_weights(first, second)
    assert first.steps == SHORT_STEPS and first.epochs_completed == 2 and first.finished
    # Training moved the weights away from their initialization.
    assert first.weights_sha256 != weights_sha256(build_model(SHORT))


@FEW
@given(shuffle=st.integers(0, 2**32 - 1))
def test_row_order_of_the_input_does_not_matter(shuffle: int) -> None:
    order = np.random.default_rng(shuffle).permutation(len(digits()))
    assert_same_weights(train(digits().select(order), SHORT), uninterrupted())


def test_a_different_seed_gives_different_weights() -> None:
    other = train(digits(), dataclasses.replace(SHORT, seed=SHORT.seed + 1))
    assert other.weights_sha256 != uninterrupted().weights_sha256


def test_checkpointing_along_the_way_does_not_change_the_weights(tmp_path: Path) -> None:
    config = dataclasses.replace(SHORT, checkpoint_every=10)
    result = train(digits(), config, checkpoint_path=tmp_path / "run.ckpt")
    assert_same_weights(result, uninterrupted())
    assert Checkpoint.load(tmp_path / "run.ckpt", config=config).global_step == 40


# --- interruption and resume -------------------------------------------------------------


@FEW
@given(k=st.integers(min_value=1, max_value=SHORT_STEPS - 1))
@example(k=1)
@example(k=STEPS_PER_EPOCH)  # exactly at the epoch boundary
@example(k=STEPS_PER_EPOCH + 1)
def test_interrupted_at_step_k_and_resumed_ends_where_the_uninterrupted_run_does(k: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.ckpt"
        stopped = train(digits(), SHORT, checkpoint_path=path, stop_after_steps=k)
        assert (stopped.steps, stopped.finished) == (k, False)
        assert stopped.weights_sha256 != uninterrupted().weights_sha256
        # The next batch the resumed run draws is the one the uninterrupted run used at step k.
        reference = EpochSampler(TRAIN_ROWS, SHORT.batch_size, SHORT.seed)
        batches = [reference.next_batch() for _ in range(SHORT_STEPS)]
        resumed_sampler = EpochSampler(TRAIN_ROWS, SHORT.batch_size, SHORT.seed)
        saved = Checkpoint.load(path, config=SHORT)
        resumed_sampler.restore(saved.epoch, saved.step_in_epoch, saved.permutation, saved.rng.sampler)
        assert torch.equal(resumed_sampler.next_batch(), batches[k])

        resumed = train(digits(), SHORT, checkpoint_path=path, resume=True)
    assert resumed.finished and resumed.steps == SHORT_STEPS
    assert_same_weights(resumed, uninterrupted())
    assert resumed.heldout_accuracy == uninterrupted().heldout_accuracy


@FEW
@given(stops=st.lists(st.integers(1, SHORT_STEPS - 1), min_size=2, max_size=4, unique=True).map(sorted))
def test_a_run_interrupted_several_times_still_ends_where_the_uninterrupted_run_does(stops: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.ckpt"
        train(digits(), SHORT, checkpoint_path=path, stop_after_steps=stops[0])
        for stop in stops[1:]:
            assert train(digits(), SHORT, checkpoint_path=path, resume=True, stop_after_steps=stop).steps == stop
        resumed = train(digits(), SHORT, checkpoint_path=path, resume=True)
    assert_same_weights(resumed, uninterrupted())


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    train(digits(), SHORT, checkpoint_path=path, stop_after_steps=3)
    with pytest.raises(ConfigurationError, match="learning_rate: checkpoint 0.05, now 0.1"):
        train(digits(), dataclasses.replace(SHORT, learning_rate=0.1), checkpoint_path=path, resume=True)


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"resume": True}, "resume"),
        ({"stop_after_steps": 3}, "stop_after_steps"),
    ],
)
def test_interruption_and_resume_need_a_checkpoint_path(arguments: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=f"checkpoint_path is required with {named}"):
        train(digits(), SHORT, **arguments)  # type: ignore[arg-type]


# --- the default run ---------------------------------------------------------------------


def test_the_default_config_learns_the_digits() -> None:
    seen: list[tuple[int, int]] = []
    result = train(digits(), TrainConfig(), progress=lambda done, total: seen.append((done, total)))
    assert result.heldout_accuracy >= 0.95
    assert result.finished and result.steps == 40 * STEPS_PER_EPOCH and result.epochs_completed == 40
    assert seen == [(step, 40 * STEPS_PER_EPOCH) for step in range(1, 40 * STEPS_PER_EPOCH + 1)]
    assert result.device == "cpu" or result.device.startswith("cuda")
    env = result.environment
    assert env["deterministic_algorithms"] is True and env["torch"] == torch.__version__
    assert env["torch_threads"] == 1


# --- the held-out split ------------------------------------------------------------------


def test_split_holds_out_about_the_asked_share_by_id_alone() -> None:
    train_rows, heldout = digits().split(20)
    assert (len(train_rows), len(heldout)) == (TRAIN_ROWS, len(digits()) - TRAIN_ROWS)
    assert 0.17 < len(heldout) / len(digits()) < 0.23
    assert all(holdout_bucket(i) < 20 for i in heldout.sample_ids)
    assert not set(train_rows.sample_ids) & set(heldout.sample_ids)
    assert list(train_rows.sample_ids) == sorted(train_rows.sample_ids)


@settings(max_examples=25, deadline=None)
@given(ids=st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=30), data=st.data())
def test_a_samples_side_of_the_split_depends_on_its_id_only(ids: set[str], data: st.DataObject) -> None:
    ordered = data.draw(st.permutations(sorted(ids)))
    some = data.draw(st.sets(st.sampled_from(ordered)))
    _, heldout = examples_for(ordered).split(30)
    _, heldout_of_some = examples_for(list(some)).split(30)
    assert set(heldout_of_some.sample_ids) == set(heldout.sample_ids) & some


def examples_for(ids: list[str]) -> Examples:
    return Examples(tuple(ids), np.zeros((len(ids), 64), np.float32), np.zeros(len(ids), np.int64))


def test_holdout_bucket_is_a_stable_hash() -> None:
    # sha256(b"digit-0000") starts with 58f1c91f9660d52b; a salted hash() would change between processes.
    assert holdout_bucket("digit-0000") == 0x58F1C91F9660D52B % 100 == 43


# --- validation of examples and config ---------------------------------------------------


def _rows(n: int = 3) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    return tuple(f"s{i}" for i in range(n)), np.zeros((n, 64), np.float32), np.arange(n, dtype=np.int64)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ids, x, y: (ids, x[:, :63], y), r"features: shape must be \(3, 64\), got \(3, 63\)"),
        (lambda ids, x, y: (ids, x.astype(np.float64), y), "features: must be a float32 numpy array, got float64"),
        (lambda ids, x, y: (ids, x + np.eye(3, 64, dtype=np.float32) * 17, y), "features: row 0 column 0 is 17.0"),
        (lambda ids, x, y: (ids, x, np.array([0, 10, 1])), "labels: row 1 has label 10, outside 0..9"),
        (lambda ids, x, y: (ids, x, np.array([0, -1, 1])), "labels: row 1 has label -1"),
        (lambda ids, x, y: (ids, x, y.astype(np.int32)), "labels: must be an int64 numpy array, got int32"),
        (lambda ids, x, y: (ids, x, y[:2]), r"labels: shape must be \(3,\), got \(2,\)"),
        (lambda ids, x, y: (("s0", "s1", "s0"), x, y), "sample_ids: sample id 's0' is duplicated"),
        (lambda ids, x, y: (("s0", "", "s2"), x, y), "sample_ids: row 1 is ''"),
    ],
)
def test_examples_validation_names_the_bad_thing(change: Callable[..., tuple[Any, ...]], message: str) -> None:
    with pytest.raises(InvalidDataset, match=message):
        Examples(*change(*_rows()))


def test_examples_are_copied_and_read_only() -> None:
    ids, features, labels = _rows()
    examples = Examples(ids, features, labels)
    features[0, 0] = 5.0
    assert examples.features[0, 0] == 0.0
    with pytest.raises(ValueError):
        examples.labels[0] = 1


def test_config_json_is_canonical_and_round_trips() -> None:
    config = TrainConfig(seed=7, device="cpu")
    text = config.to_json()
    assert text.startswith('{"batch_size":64,"checkpoint_every":0,"device":"cpu","epochs":40,')
    assert TrainConfig.from_json(text) == config


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": True}, "batch_size"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"holdout_percent": 100}, "holdout_percent"),
        ({"device": "tpu"}, "device"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_config_from_json_refuses_unknown_fields() -> None:
    with pytest.raises(ConfigurationError, match="unknown field.*'momentum'"):
        TrainConfig.from_json('{"momentum":0.5}')


# --- the weights hash --------------------------------------------------------------------


def test_weights_hash_sees_one_flipped_bit_and_ignores_insertion_order() -> None:
    state = dict(build_model(SHORT).state_dict())
    reference = weights_sha256(state)
    assert weights_sha256(dict(reversed(list(state.items())))) == reference
    flipped = state["1.weight"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1
    assert weights_sha256({**state, "1.weight": flipped}) != reference
    assert weights_sha256(build_model(SHORT)) == reference  # the model is built from the seed alone
