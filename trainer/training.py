"""Deterministic, exactly resumable training of any recipe on a table of rows.

Same rows + same recipe and config + same software and device type = same weights, bit
for bit, whether the run went straight through or was interrupted and resumed from a
checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from events.errors import ConfigurationError, InvalidDataset
from trainer.checkpoint import Checkpoint, RngStates
from trainer.config import TrainConfig
from trainer.data import EpochSampler, Table
from trainer.determinism import environment, fixed_cpu_threads, make_deterministic, select_device
from trainer.model import build_model, weights_sha256
from trainer.recipe import Recipe, checked_metrics

Progress = Callable[[int, int], None]  #: called with (steps done, total steps) after every step


@dataclass(frozen=True)
class TrainResult:
    """What a run produced. ``state_dict`` holds CPU copies; ``finished`` is False when interrupted."""

    weights_sha256: str
    metrics: dict[str, float]
    steps: int
    epochs_completed: int
    device: str
    environment: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    finished: bool


@fixed_cpu_threads()
def train(
    recipe: Recipe[Any],
    table: Table,
    config: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``recipe`` on ``table`` from scratch, or from ``checkpoint_path`` when ``resume``.

    1. check the arguments, turn on every determinism switch (:func:`make_deterministic`),
       pick the device;
    2. sort the rows by row id and split them by a hash of it, so input row order never
       matters (:meth:`Table.split`);
    3. move the recipe's input and target columns to the device once, whole;
    4. build the model from the seed and the training split (:func:`build_model`) and the
       recipe's optimizer; when resuming, load model, optimizer, sampler position and every
       generator from the checkpoint;
    5. step through seeded batches (:class:`EpochSampler`); ``loss`` and ``backward`` and
       ``step`` each time; checkpoint every ``config.checkpoint_every`` steps;
       ``stop_after_steps`` simulates an interruption: the run checkpoints after that many
       steps (counted from the start of the run, across resumes) and returns with
       ``finished=False``;
    6. hash the weights and compute the recipe's metrics on the held-out split.

    Batches come from a seeded permutation per epoch rather than a ``DataLoader`` with
    workers, whose prefetching and per-worker RNG would make an exact resume much harder.
    Trains with a fixed number of CPU threads (see :func:`fixed_cpu_threads`).
    """
    _check_arguments(config, checkpoint_path, resume, stop_after_steps)
    make_deterministic(config.seed)
    device = select_device(config.device)
    recipe.check_table(table)
    train_set, heldout = _split(table, config.holdout_percent)
    inputs = torch.tensor(train_set[recipe.inputs], device=device)
    targets = torch.tensor(train_set[recipe.target], device=device)
    model = build_model(recipe, config, train_set).to(device)
    optimizer = recipe.optimizer(config, model)
    sampler = EpochSampler(len(train_set), config.batch_size, config.seed)
    step = 0
    if resume:
        assert checkpoint_path is not None  # checked above
        step = _restore(Checkpoint.load(checkpoint_path, config=config), model, optimizer, sampler)
        if stop_after_steps is not None and stop_after_steps <= step:
            raise ConfigurationError(f"stop_after_steps {stop_after_steps} is not after the checkpoint's step {step}")
    total_steps = sampler.steps_per_epoch * config.epochs

    model.train()
    while sampler.epoch < config.epochs:
        batch = sampler.next_batch().to(device)
        _train_step(recipe, model, optimizer, inputs[batch], targets[batch])
        step += 1
        if progress is not None:
            progress(step, total_steps)
        interrupted = step == stop_after_steps
        if interrupted or (config.checkpoint_every and step % config.checkpoint_every == 0):
            assert checkpoint_path is not None  # checked above
            _capture(config, step, model, optimizer, sampler, device).save(checkpoint_path)
        if interrupted:
            break

    return TrainResult(
        weights_sha256=weights_sha256(model),
        metrics=evaluate(recipe, model, heldout, device),
        steps=step,
        epochs_completed=sampler.epoch,
        device=str(device),
        environment=environment(device),
        state_dict={name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()},
        finished=sampler.epoch >= config.epochs,
    )


def evaluate(recipe: Recipe[Any], model: nn.Module, table: Table, device: torch.device) -> dict[str, float]:
    """The recipe's metrics of ``model`` on ``table``, in eval mode, without gradients."""
    if len(table) == 0:
        raise InvalidDataset("rows", "cannot compute metrics on zero rows")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = model(torch.tensor(table[recipe.inputs], device=device))
        values = recipe.metrics(outputs, torch.tensor(table[recipe.target], device=device))
    model.train(was_training)
    return checked_metrics(recipe, values)


def _train_step(recipe: Recipe[Any], model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                targets: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = recipe.loss(model(inputs), targets)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def _check_arguments(config: TrainConfig, path: Path | None, resume: bool, stop_after_steps: int | None) -> None:
    needs_path = [
        reason
        for reason, wanted in (
            ("resume", resume),
            ("stop_after_steps", stop_after_steps is not None),
            ("checkpoint_every", config.checkpoint_every > 0),
        )
        if wanted
    ]
    if needs_path and path is None:
        raise ConfigurationError(f"checkpoint_path is required with {', '.join(needs_path)}")
    if stop_after_steps is not None and (isinstance(stop_after_steps, bool) or stop_after_steps < 1):
        raise ConfigurationError(f"stop_after_steps must be at least 1, got {stop_after_steps!r}")


def _split(table: Table, holdout_percent: int) -> tuple[Table, Table]:
    train_set, heldout = table.split(holdout_percent)
    if len(train_set) == 0 or len(heldout) == 0:
        raise InvalidDataset(
            "holdout_percent",
            f"{holdout_percent}% of {len(table)} rows leaves {len(train_set)} to train on and {len(heldout)} held out",
        )
    return train_set, heldout


def _capture(
    config: TrainConfig, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: EpochSampler,
    device: torch.device,
) -> Checkpoint:
    return Checkpoint(
        config_json=config.to_json(),
        epoch=sampler.epoch,
        step_in_epoch=sampler.step,
        global_step=step,
        permutation=sampler.permutation,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        rng=RngStates.capture(sampler.generator, cuda=device.type == "cuda"),
        environment=environment(device),
    )


def _restore(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: EpochSampler) -> int:
    """Load every piece of state; return the global step the checkpoint was taken at."""
    model.load_state_dict(checkpoint.model)
    optimizer.load_state_dict(checkpoint.optimizer)
    sampler.restore(checkpoint.epoch, checkpoint.step_in_epoch, checkpoint.permutation, checkpoint.rng.sampler)
    checkpoint.rng.restore_globals()
    return checkpoint.global_step
