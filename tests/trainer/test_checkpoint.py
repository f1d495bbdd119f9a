"""The checkpoint contract: complete, refused when it does not fit, never half-written."""

from __future__ import annotations

import re

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from events.errors import ConfigurationError, IntegrityError, NotFound
from tests.support.training import digits, mlp
from trainer import checkpoint as checkpoint_module
from trainer.checkpoint import FORMAT_VERSION, READABLE_VERSIONS, Checkpoint, RngStates
from trainer.data import EpochSampler
from trainer.training import train

MLP = mlp()
CONFIG: Any = MLP.config(epochs=1)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A checkpoint taken mid-epoch, after 5 of 23 steps."""
    path = tmp_path / "run.ckpt"
    train(MLP, digits(), CONFIG, checkpoint_path=path, stop_after_steps=5)
    return path


def rewrite(path: Path, **changes: Any) -> None:
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, **changes}, path)


def test_a_checkpoint_holds_the_whole_position(saved: Path) -> None:
    loaded = Checkpoint.load(saved, config=CONFIG)
    assert (loaded.format_version, loaded.epoch, loaded.step_in_epoch, loaded.global_step) == (FORMAT_VERSION, 0, 5, 5)
    assert loaded.config_json == CONFIG.to_json()
    assert loaded.permutation is not None and sorted(loaded.permutation.tolist()) == list(range(1414))
    assert loaded.optimizer["state"], "SGD momentum buffers are part of the state"
    assert loaded.rng.torch_cuda == () and loaded.environment["device_type"] == "cpu"
    assert set(loaded.model) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}


def test_loading_refuses_a_changed_config_naming_each_difference(saved: Path) -> None:
    changed = dataclasses.replace(CONFIG, seed=1, hidden=64)
    with pytest.raises(ConfigurationError, match="hidden: checkpoint 128, now 64, seed: checkpoint 1234, now 1"):
        Checkpoint.load(saved, config=changed)


def test_loading_refuses_another_format_version(saved: Path) -> None:
    rewrite(saved, format_version=FORMAT_VERSION + 1)
    expected = re.escape(f"format_version {FORMAT_VERSION + 1}; this version reads {READABLE_VERSIONS}")
    with pytest.raises(IntegrityError, match=expected):
        Checkpoint.load(saved, config=CONFIG)


def test_loading_refuses_weights_that_do_not_match_their_hash(saved: Path) -> None:
    model = torch.load(saved, weights_only=True)["model"]
    model["5.bias"] = model["5.bias"] + 1
    rewrite(saved, model=model)
    with pytest.raises(IntegrityError, match="do not match their recorded model_sha256"):
        Checkpoint.load(saved, config=CONFIG)


def test_loading_refuses_a_truncated_file_and_a_missing_one(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match="not a readable checkpoint"):
        Checkpoint.load(saved, config=CONFIG)
    with pytest.raises(NotFound, match="does not exist"):
        Checkpoint.load(saved.with_name("other.ckpt"), config=CONFIG)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()
    checkpoint = Checkpoint.load(saved, config=CONFIG)

    def crash_midway(payload: object, file: Any) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        dataclasses.replace(checkpoint, global_step=6).save(saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_save_then_load_gives_back_equal_state(saved: Path, tmp_path: Path) -> None:
    original = Checkpoint.load(saved, config=CONFIG)
    copy_path = tmp_path / "nested" / "copy.ckpt"
    original.save(copy_path)
    copy = Checkpoint.load(copy_path, config=CONFIG)
    assert all(torch.equal(copy.model[name], tensor) for name, tensor in original.model.items())
    assert copy.permutation is not None and original.permutation is not None
    assert torch.equal(copy.permutation, original.permutation)
    assert torch.equal(copy.rng.sampler, original.rng.sampler) and copy.rng.python == original.rng.python


@settings(max_examples=20, deadline=None)
@given(draws=st.integers(0, 50))
def test_restored_generators_repeat_the_same_numbers(draws: int) -> None:
    sampler = torch.Generator().manual_seed(7)
    for _ in range(draws):  # move every generator to an arbitrary point
        random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=sampler)
    captured = RngStates.capture(sampler, cuda=False)

    def draw() -> tuple[float, float, float, float]:
        return random.random(), float(np.random.rand()), torch.rand(1).item(), torch.rand(1, generator=sampler).item()

    expected = draw()
    draw()
    captured.restore_globals()
    sampler.set_state(captured.sampler)
    assert draw() == expected


def test_sampler_refuses_an_impossible_position() -> None:
    sampler = EpochSampler(10, 4, seed=0)
    state = sampler.generator.get_state()
    with pytest.raises(IntegrityError, match="not a permutation of 10 rows"):
        sampler.restore(0, 1, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), state)
    with pytest.raises(IntegrityError, match="mid-epoch but no permutation"):
        sampler.restore(0, 1, None, state)
    with pytest.raises(IntegrityError, match="outside 0..2"):
        sampler.restore(0, 3, torch.arange(10), state)


def test_sampler_covers_every_row_once_per_epoch() -> None:
    sampler = EpochSampler(10, 4, seed=0)
    epochs = [torch.cat([sampler.next_batch() for _ in range(3)]) for _ in range(2)]
    assert [sorted(e.tolist()) for e in epochs] == [list(range(10))] * 2
    assert not torch.equal(epochs[0], epochs[1]) and sampler.epoch == 2
