"""Deterministic training of a recipe on the real digits: same inputs, same weights, bit for bit.

Determinism tests train the digits example's MLP for two epochs (46 steps); one test trains
its default config to measure accuracy, one the clinic example's logistic regression.
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
from tests.support.training import DIGIT_COLUMNS, digits, logistic, mlp, scans
from trainer.checkpoint import Checkpoint
from trainer.config import TrainConfig
from trainer.data import EpochSampler, Table, holdout_bucket
from trainer.model import build_model, weights_sha256
from trainer.training import TrainResult, train

MLP = mlp()
SHORT: Any = MLP.config(epochs=2)
TRAIN_ROWS = 1414  # of 1,797: the other 383 are held out by the hash of their id
STEPS_PER_EPOCH = math.ceil(TRAIN_ROWS / SHORT.batch_size)  # 23
SHORT_STEPS = 2 * STEPS_PER_EPOCH
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def uninterrupted(config: TrainConfig = SHORT) -> TrainResult:
    return train(MLP, digits(), config)


def assert_same_weights(left: TrainResult, right: TrainResult) -> None:
    assert left.weights_sha256 == right.weights_sha256
    assert left.state_dict.keys() == right.state_dict.keys()
    for name, tensor in left.state_dict.items():
        assert torch.equal(tensor, right.state_dict[name]), name


# --- determinism ------------------------------------------------------------------------


def test_same_examples_and_config_give_identical_weights() -> None:
    first, second = train(MLP, digits(), SHORT), train(MLP, digits(), SHORT)
    assert_same_weights(first, second)
    assert first.steps == SHORT_STEPS and first.epochs_completed == 2 and first.finished
    # Training moved the weights away from their initialization.
    assert first.weights_sha256 != weights_sha256(build_model(MLP, SHORT, digits()))


@FEW
@given(shuffle=st.integers(0, 2**32 - 1))
def test_row_order_of_the_input_does_not_matter(shuffle: int) -> None:
    order = np.random.default_rng(shuffle).permutation(len(digits()))
    assert_same_weights(train(MLP, digits().select(order), SHORT), uninterrupted())


def test_a_different_seed_gives_different_weights() -> None:
    other = train(MLP, digits(), dataclasses.replace(SHORT, seed=SHORT.seed + 1))
    assert other.weights_sha256 != uninterrupted().weights_sha256


def test_checkpointing_along_the_way_does_not_change_the_weights(tmp_path: Path) -> None:
    config = dataclasses.replace(SHORT, checkpoint_every=10)
    result = train(MLP, digits(), config, checkpoint_path=tmp_path / "run.ckpt")
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
        stopped = train(MLP, digits(), SHORT, checkpoint_path=path, stop_after_steps=k)
        assert (stopped.steps, stopped.finished) == (k, False)
        assert stopped.weights_sha256 != uninterrupted().weights_sha256
        # The next batch the resumed run draws is the one the uninterrupted run used at step k.
        reference = EpochSampler(TRAIN_ROWS, SHORT.batch_size, SHORT.seed)
        batches = [reference.next_batch() for _ in range(SHORT_STEPS)]
        resumed_sampler = EpochSampler(TRAIN_ROWS, SHORT.batch_size, SHORT.seed)
        saved = Checkpoint.load(path, config=SHORT)
        resumed_sampler.restore(saved.epoch, saved.step_in_epoch, saved.permutation, saved.rng.sampler)
        assert torch.equal(resumed_sampler.next_batch(), batches[k])

        resumed = train(MLP, digits(), SHORT, checkpoint_path=path, resume=True)
    assert resumed.finished and resumed.steps == SHORT_STEPS
    assert_same_weights(resumed, uninterrupted())
    assert resumed.metrics == uninterrupted().metrics


@FEW
@given(stops=st.lists(st.integers(1, SHORT_STEPS - 1), min_size=2, max_size=4, unique=True).map(sorted))
def test_a_run_interrupted_several_times_still_ends_where_the_uninterrupted_run_does(stops: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.ckpt"
        train(MLP, digits(), SHORT, checkpoint_path=path, stop_after_steps=stops[0])
        for stop in stops[1:]:
            assert train(MLP, digits(), SHORT, checkpoint_path=path, resume=True, stop_after_steps=stop).steps == stop
        resumed = train(MLP, digits(), SHORT, checkpoint_path=path, resume=True)
    assert_same_weights(resumed, uninterrupted())


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    train(MLP, digits(), SHORT, checkpoint_path=path, stop_after_steps=3)
    with pytest.raises(ConfigurationError, match="learning_rate: checkpoint 0.05, now 0.1"):
        train(MLP, digits(), dataclasses.replace(SHORT, learning_rate=0.1), checkpoint_path=path, resume=True)


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"resume": True}, "resume"),
        ({"stop_after_steps": 3}, "stop_after_steps"),
    ],
)
def test_interruption_and_resume_need_a_checkpoint_path(arguments: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=f"checkpoint_path is required with {named}"):
        train(MLP, digits(), SHORT, **arguments)  # type: ignore[arg-type]


# --- the default run ---------------------------------------------------------------------


def test_the_default_config_learns_the_digits() -> None:
    seen: list[tuple[int, int]] = []
    result = train(MLP, digits(), MLP.default_config(), progress=lambda done, total: seen.append((done, total)))
    assert result.metrics["accuracy"] >= 0.95
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
    assert all(holdout_bucket(i) < 20 for i in heldout.row_ids)
    assert not set(train_rows.row_ids) & set(heldout.row_ids)
    assert list(train_rows.row_ids) == sorted(train_rows.row_ids)


@settings(max_examples=25, deadline=None)
@given(ids=st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=30), data=st.data())
def test_a_rows_side_of_the_split_depends_on_its_id_only(ids: set[str], data: st.DataObject) -> None:
    ordered = data.draw(st.permutations(sorted(ids)))
    some = data.draw(st.sets(st.sampled_from(ordered)))
    _, heldout = table_for(ordered).split(30)
    _, heldout_of_some = table_for(list(some)).split(30)
    assert set(heldout_of_some.row_ids) == set(heldout.row_ids) & some


def table_for(ids: list[str]) -> Table:
    return Table(DIGIT_COLUMNS, tuple(ids), {"features": np.zeros((len(ids), 64), np.float32),
                                             "label": np.zeros(len(ids), np.int64)})


def test_holdout_bucket_is_a_stable_hash() -> None:
    # sha256(b"digit-0000") starts with 58f1c91f9660d52b; a salted hash() would change between processes.
    assert holdout_bucket("digit-0000") == 0x58F1C91F9660D52B % 100 == 43


# --- validation of tables and config ------------------------------------------------------


def _rows(n: int = 3) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    return tuple(f"s{i}" for i in range(n)), np.zeros((n, 64), np.float32), np.arange(n, dtype=np.int64)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ids, x, y: (ids, x[:, :63], y), r"features: shape must be \(3, 64\), got \(3, 63\)"),
        (lambda ids, x, y: (ids, x.astype(np.float64), y), "features: must be a float32 numpy array, got float64"),
        (lambda ids, x, y: (ids, x, y.astype(np.int32)), "label: must be a int64 numpy array, got int32"),
        (lambda ids, x, y: (ids, x, y[:2]), r"label: shape must be \(3,\), got \(2,\)"),
        (lambda ids, x, y: (("s0", "s1", "s0"), x, y), "row_ids: row id 's0' is duplicated"),
        (lambda ids, x, y: (("s0", "", "s2"), x, y), "row_ids: row 1 is ''"),
    ],
)
def test_table_validation_names_the_bad_thing(change: Callable[..., tuple[Any, ...]], message: str) -> None:
    ids, x, y = change(*_rows())
    with pytest.raises(InvalidDataset, match=message):
        Table(DIGIT_COLUMNS, ids, {"features": x, "label": y})


def test_tables_are_copied_and_read_only() -> None:
    ids, features, labels = _rows()
    table = Table(DIGIT_COLUMNS, ids, {"features": features, "label": labels})
    features[0, 0] = 5.0
    assert table["features"][0, 0] == 0.0
    with pytest.raises(ValueError):
        table["label"][0] = 1


def test_config_json_is_canonical_and_round_trips() -> None:
    config = MLP.config(seed=7, device="cpu")
    text = config.to_json()
    assert text.startswith('{"batch_size":64,"checkpoint_every":0,"device":"cpu","epochs":40,"hidden":128,')
    assert MLP.config.from_json(text) == config


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": True}, "batch_size"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"hidden": 1.5}, "hidden"),
        ({"holdout_percent": 100}, "holdout_percent"),
        ({"device": "tpu"}, "device"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        MLP.config(**changes)


def test_config_refuses_an_unknown_key_naming_it() -> None:
    with pytest.raises(ConfigurationError, match="MLPConfig has no field 'dropout'"):
        MLP.config.from_json('{"dropout":0.5}')
    with pytest.raises(ConfigurationError, match="--set dropout: MLPConfig has no field 'dropout'"):
        MLP.parse_config(["epochs=3", "dropout=0.5"])


def test_set_parses_values_by_the_fields_types() -> None:
    config = MLP.parse_config(["epochs=3", "learning_rate=0.1", "device=cpu", "hidden = 32"])
    assert config == MLP.config(epochs=3, learning_rate=0.1, device="cpu", hidden=32)
    with pytest.raises(ConfigurationError, match="--set epochs=three: not a valid int"):
        MLP.parse_config(["epochs=three"])
    with pytest.raises(ConfigurationError, match="expected key=value"):
        MLP.parse_config(["epochs"])


# --- the weights hash --------------------------------------------------------------------


def test_weights_hash_sees_one_flipped_bit_and_ignores_insertion_order() -> None:
    state = dict(build_model(MLP, SHORT, digits()).state_dict())
    reference = weights_sha256(state)
    assert weights_sha256(dict(reversed(list(state.items())))) == reference
    flipped = state["1.weight"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1
    assert weights_sha256({**state, "1.weight": flipped}) != reference
    assert weights_sha256(build_model(MLP, SHORT, digits())) == reference  # built from the seed alone


# --- another recipe: statistics of the training split live in the weights -----------------


def test_the_clinic_recipe_standardises_inside_the_model_and_learns_the_scans() -> None:
    recipe = logistic()
    config = recipe.default_config()
    first, second = train(recipe, scans(), config), train(recipe, scans(), config)
    assert_same_weights(first, second)
    assert first.metrics["accuracy"] >= 0.93 and first.metrics["auc"] >= 0.95
    train_rows, _ = scans().split(config.holdout_percent)
    expected_mean = torch.tensor(train_rows["features"]).mean(dim=0)
    assert torch.allclose(first.state_dict["0.mean"], expected_mean)
    # The statistics are buffers, so they are part of the hash: other training rows, other weights.
    other = train(recipe, scans().select(np.arange(0, 400)), config)
    assert other.weights_sha256 != first.weights_sha256
