"""Deterministic, exactly resumable training of any recipe on a table of rows.

Same rows + same recipe and config + same software and device type = same weights, bit
for bit, whether the run went straight through or was interrupted and resumed from a
checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from events.errors import ConfigurationError, InvalidDataset
from trainer.checkpoint import Checkpoint, RngStates
from trainer.config import TrainConfig
from trainer.data import EpochSampler, Table
from trainer.distributed import SINGLE, World, gather, wrap
from trainer.loader import Prefetcher, ShardRows, ShardSet
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
    seconds: float = 0.0  #: wall time of the training steps alone (no setup, no evaluation)


Source = Table | ShardSet  #: what a run trains on: a table in memory, or a snapshot's shards streamed


@fixed_cpu_threads()
def train(
    recipe: Recipe[Any],
    table: Source,
    config: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    progress: Progress | None = None,
    world: World = SINGLE,
    workers: int = 0,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``recipe`` on ``table`` from scratch, or from ``checkpoint_path`` when ``resume``.

    1. check the arguments, turn on every determinism switch (:func:`make_deterministic`),
       pick the device;
    2. sort the rows by row id and split them by a hash of it, so input row order never
       matters (:meth:`Table.split`, :meth:`ShardSet.split`: the same split);
    3. a table's input and target columns move to the device once, whole; a shard set's
       rows stay in their files and each batch is gathered (by ``workers`` processes, ahead
       of the step that needs it) and moved when it is trained on;
    4. build the model from the seed and the training split (:func:`build_model`), wrap it
       for the data-parallel ``world`` (:func:`trainer.distributed.wrap`), and the recipe's
       optimizer; when resuming, load model, optimizer, sampler position and every
       generator from the checkpoint, which must come from a world of the same size;
    5. step through seeded batches (:class:`EpochSampler`, each rank its slice); ``loss``
       and ``backward`` and ``step`` each time; checkpoint every ``config.checkpoint_every``
       steps (rank 0 writes every rank's generators); ``stop_after_steps`` simulates an
       interruption: the run checkpoints after that many steps (counted from the start of
       the run, across resumes) and returns with ``finished=False``;
    6. hash the weights and compute the recipe's metrics on the held-out split.

    The same rows, recipe, config and world size on the same device type and software give
    the same weights bit for bit, straight through or resumed, and whether the rows came
    from memory or from shards, with or without workers. Trains with a fixed number of CPU
    threads (see :func:`fixed_cpu_threads`).
    """
    _check_arguments(config, checkpoint_path, resume, stop_after_steps)
    make_deterministic(config.seed)
    device = device if device is not None else select_device(config.device)  # a rank's own GPU, under DDP
    recipe.check_table(table)
    train_set, heldout = _split(table, config.holdout_percent)
    feed = _Feed(recipe, train_set, device, workers)
    model = build_model(recipe, config, train_set).to(device)
    trained = wrap(model, world, device)
    optimizer = recipe.optimizer(config, model)
    sampler = EpochSampler(len(train_set), config.batch_size, config.seed, world_size=world.size, rank=world.rank)
    step = 0
    if resume:
        assert checkpoint_path is not None  # checked above
        checkpoint = Checkpoint.load(checkpoint_path, config=config)
        checkpoint.for_world(world.size, checkpoint_path)
        step = _restore(checkpoint, world, model, optimizer, sampler)
        if stop_after_steps is not None and stop_after_steps <= step:
            raise ConfigurationError(f"stop_after_steps {stop_after_steps} is not after the checkpoint's step {step}")
    total_steps = sampler.steps_per_epoch * config.epochs

    trained.train()
    started = time.perf_counter()
    interrupted = False
    while sampler.epoch < config.epochs and not interrupted:
        for inputs, targets in feed.batches(sampler.remaining()):
            sampler.advance()
            _train_step(recipe, trained, optimizer, inputs, targets)
            step += 1
            if progress is not None and world.first:
                progress(step, total_steps)
            interrupted = step == stop_after_steps
            if interrupted or (config.checkpoint_every and step % config.checkpoint_every == 0):
                assert checkpoint_path is not None  # checked above
                _checkpoint(config, step, model, optimizer, sampler, device, world, checkpoint_path)
            if interrupted:
                break
    seconds = time.perf_counter() - started

    return TrainResult(
        weights_sha256=weights_sha256(model),
        metrics=evaluate(recipe, model, heldout, device),
        steps=step,
        epochs_completed=sampler.epoch,
        device=str(device),
        environment=environment(device) | {"world_size": world.size, "backend": world.backend},
        state_dict={name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()},
        finished=sampler.epoch >= config.epochs,
        seconds=seconds,
    )


class _Feed:
    """Step 3: the (inputs, targets) of each batch, on the device."""

    def __init__(self, recipe: Recipe[Any], rows: Table | ShardRows, device: torch.device, workers: int) -> None:
        self.names, self.device, self.workers = (recipe.inputs, recipe.target), device, workers
        self.rows = rows
        if isinstance(rows, Table):
            self.columns = [torch.tensor(rows[name], device=device) for name in self.names]

    def batches(self, plan: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.rows, Table):
            for index in plan:
                on_device = index.to(self.device)
                yield self.columns[0][on_device], self.columns[1][on_device]
            return
        for batch in Prefetcher(self.rows, plan, self.names, workers=self.workers):
            yield batch[self.names[0]].to(self.device), batch[self.names[1]].to(self.device)


#: Held-out rows evaluated per forward pass when they come from shards (a fixed size, so the
#: metrics of a run are the same every time it is computed).
EVALUATION_CHUNK = 8192


def evaluate(recipe: Recipe[Any], model: nn.Module, table: Table | ShardRows, device: torch.device) -> dict[str, float]:
    """The recipe's metrics of ``model`` on ``table``, in eval mode, without gradients."""
    if len(table) == 0:
        raise InvalidDataset("rows", "cannot compute metrics on zero rows")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if isinstance(table, Table):
            outputs = model(torch.tensor(table[recipe.inputs], device=device))
            targets = torch.tensor(table[recipe.target], device=device)
        else:
            parts = [table.batch(torch.arange(start, min(start + EVALUATION_CHUNK, len(table))),
                                 (recipe.inputs, recipe.target)) for start in range(0, len(table), EVALUATION_CHUNK)]
            outputs = torch.cat([model(p[recipe.inputs].to(device)) for p in parts])
            targets = torch.cat([p[recipe.target].to(device) for p in parts])
        values = recipe.metrics(outputs, targets)
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


def _split(table: Source, holdout_percent: int) -> tuple[Table | ShardRows, Table | ShardRows]:
    train_set, heldout = table.split(holdout_percent)
    if len(train_set) == 0 or len(heldout) == 0:
        raise InvalidDataset(
            "holdout_percent",
            f"{holdout_percent}% of {len(table)} rows leaves {len(train_set)} to train on and {len(heldout)} held out",
        )
    return train_set, heldout


def _checkpoint(config: TrainConfig, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                sampler: EpochSampler, device: torch.device, world: World, path: Path) -> None:
    """Every rank's generators gathered to rank 0, which writes the checkpoint."""
    ranks = gather(RngStates.capture(sampler.generator, cuda=device.type == "cuda"), world)
    if not world.first:
        return
    Checkpoint(
        config_json=config.to_json(),
        epoch=sampler.epoch,
        step_in_epoch=sampler.step,
        global_step=step,
        permutation=sampler.permutation,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        ranks=tuple(ranks),
        environment=environment(device),
        world_size=world.size,
        backend=world.backend,
    ).save(path)


def _restore(checkpoint: Checkpoint, world: World, model: nn.Module, optimizer: torch.optim.Optimizer,
             sampler: EpochSampler) -> int:
    """Load every piece of state (this rank's generators); return the global step the checkpoint was taken at."""
    model.load_state_dict(checkpoint.model)
    optimizer.load_state_dict(checkpoint.optimizer)
    mine = checkpoint.ranks[world.rank]
    sampler.restore(checkpoint.epoch, checkpoint.step_in_epoch, checkpoint.permutation, mine.sampler)
    mine.restore_globals()
    return checkpoint.global_step
