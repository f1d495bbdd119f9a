"""Training from shards streamed off disk: the same run as from memory, exact resumes, refused damage.

No services: a snapshot's shard folder is all the loader reads (as on a training machine).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from events.errors import IntegrityError, InvalidDataset
from tests.support.training import DIGIT_COLUMNS, digits, mlp
from trainer.data import EpochSampler
from trainer.loader import Prefetcher, ShardSet
from trainer.shards import write_shards
from trainer.training import train

SMALL = {"epochs": 2, "hidden": 16}


def shard_set(folder: Path, rows_per_shard: int = 300) -> ShardSet:
    infos = write_shards(digits(), folder, rows_per_shard=rows_per_shard)
    return ShardSet.open(folder, infos, DIGIT_COLUMNS, owner="snapshot test")


def config(**changes: object):  # type: ignore[no-untyped-def]
    recipe = mlp()
    return dataclasses.replace(recipe.default_config(), **{**SMALL, **changes})


def test_training_from_shards_is_the_same_run_as_from_memory(tmp_path: Path) -> None:
    recipe, chosen = mlp(), config()
    from_memory = train(recipe, digits(), chosen)
    from_shards = train(recipe, shard_set(tmp_path), chosen)
    with_workers = train(recipe, shard_set(tmp_path / "w", rows_per_shard=97), chosen, workers=2)
    assert from_memory.weights_sha256 == from_shards.weights_sha256 == with_workers.weights_sha256
    assert from_memory.metrics == from_shards.metrics and from_shards.steps == from_memory.steps


def test_a_split_from_shard_headers_is_the_tables_split(tmp_path: Path) -> None:
    train_rows, held = shard_set(tmp_path, rows_per_shard=128).split(20)
    table_train, table_held = digits().split(20)
    assert train_rows.row_ids == table_train.row_ids and held.row_ids == table_held.row_ids
    assert np.array_equal(train_rows["features"], table_train["features"])
    batch = train_rows.batch(torch.tensor([5, 0, 900]), ["label"])["label"]
    assert batch.tolist() == [int(table_train["label"][i]) for i in (5, 0, 900)]


def test_a_damaged_or_missing_shard_is_refused_by_name_before_any_step(tmp_path: Path) -> None:
    infos = write_shards(digits(), tmp_path, rows_per_shard=400)
    damaged = tmp_path / infos[1].name
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (tmp_path / infos[3].name).unlink()
    with pytest.raises(IntegrityError) as caught:
        ShardSet.open(tmp_path, infos, DIGIT_COLUMNS, owner="snapshot snap-x")
    message = str(caught.value)
    assert f"snapshot snap-x: shard {infos[1].name} has sha256" in message
    assert f"shard {infos[3].name} is missing" in message
    assert infos[0].name not in message


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 300), batch=st.integers(1, 40), world=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99),
       at=st.integers(0, 200))
def test_the_sampler_state_round_trips_at_any_step(size: int, batch: int, world: int, seed: int, at: int) -> None:
    """Stopped after ``at`` steps and restored into a fresh sampler, the rest of the order is the same."""
    batch *= world
    if world > 1 and size < batch:
        with pytest.raises(InvalidDataset):
            EpochSampler(size, batch, seed, world_size=world)
        return
    for rank in range(world):
        straight = EpochSampler(size, batch, seed, world_size=world, rank=rank)
        first = [straight.next_batch() for _ in range(at)]
        state = straight.state_dict()
        rest = [straight.next_batch() for _ in range(2 * straight.steps_per_epoch)]
        resumed = EpochSampler(size, batch, seed, world_size=world, rank=rank)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(rest, [resumed.next_batch() for _ in rest]))
        assert all(len(b) == batch // world for b in first + rest) or world == 1


def test_ranks_together_take_each_batch_once(tmp_path: Path) -> None:
    whole = EpochSampler(100, 8, 3)
    ranks = [EpochSampler(100, 8, 3, world_size=2, rank=r) for r in range(2)]
    for _ in range(ranks[0].steps_per_epoch):
        assert torch.equal(torch.cat([r.next_batch() for r in ranks]), whole.next_batch())
    with pytest.raises(InvalidDataset, match="does not split evenly over 3 ranks"):
        EpochSampler(100, 8, 3, world_size=3)


def test_prefetching_workers_hand_out_batches_in_plan_order(tmp_path: Path) -> None:
    rows, _ = shard_set(tmp_path, rows_per_shard=50).split(20)
    plan = [torch.randperm(len(rows), generator=torch.Generator().manual_seed(s))[:33] for s in range(12)]
    inline = [b["label"] for b in Prefetcher(rows, plan, ["label"])]
    ahead = [b["label"] for b in Prefetcher(rows, plan, ["label"], workers=2, prefetch=3)]
    assert len(ahead) == 12 and all(torch.equal(a, b) for a, b in zip(inline, ahead))


def test_a_sampler_state_of_another_world_or_dataset_is_refused() -> None:
    state = EpochSampler(100, 8, 1, world_size=2, rank=1).state_dict()
    with pytest.raises(IntegrityError, match="rank 1 of 2 process.*cannot resume rank 0 of 1"):
        EpochSampler(100, 8, 1).load_state_dict(state)
    with pytest.raises(IntegrityError, match="rows 100 cannot resume a sampler of 99"):
        EpochSampler(99, 8, 1, world_size=2, rank=1).load_state_dict(state)
    with pytest.raises(IntegrityError, match="version 0"):
        EpochSampler(100, 8, 1, world_size=2, rank=1).load_state_dict({**state, "version": 0})
