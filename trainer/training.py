"""Deterministic, exactly resumable training of the digits model.

Same examples + same config + same software and device type = same weights, bit for bit,
whether the run went straight through or was interrupted and resumed from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from events.errors import ConfigurationError, InvalidDataset
from trainer.checkpoint import Checkpoint, RngStates
from trainer.config import TrainConfig
from trainer.data import EpochSampler, Examples
from trainer.determinism import environment, fixed_cpu_threads, make_deterministic, select_device
from trainer.model import build_model, weights_sha256

SGD_MOMENTUM = 0.9  #: reaches ≥0.95 held-out accuracy on the digits within the default 40 epochs

Progress = Callable[[int, int], None]  #: called with (steps done, total steps) after every step


@dataclass(frozen=True)
class TrainResult:
    """What a run produced. ``state_dict`` holds CPU copies; ``finished`` is False when interrupted."""

    weights_sha256: str
    heldout_accuracy: float
    steps: int
    epochs_completed: int
    device: str
    environment: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    finished: bool


@fixed_cpu_threads()
def train(
    examples: Examples,
    config: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train from scratch, or from ``checkpoint_path`` when ``resume``; return the weights and their hash.

    Rows are sorted by sample id and split by a hash of it, so input row order never
    matters. Batches come from an :class:`~trainer.data.EpochSampler` (a seeded
    permutation per epoch) rather than a ``DataLoader`` with workers, whose prefetching
    and per-worker RNG would make an exact resume much harder; the whole dataset is
    moved to the device once and indexed there. ``stop_after_steps`` simulates an
    interruption: the run saves a checkpoint after that many steps (counted from the
    start of the run, across resumes) and returns with ``finished=False``.

    Turns on deterministic algorithms process-wide (see :func:`make_deterministic`) and
    trains with a fixed number of CPU threads (see :func:`fixed_cpu_threads`).
    """
    _check_arguments(config, checkpoint_path, resume, stop_after_steps)
    make_deterministic(config.seed)
    device = select_device(config.device)
    train_set, heldout = _split(examples, config.holdout_percent)
    inputs = torch.tensor(train_set.features, device=device)
    targets = torch.tensor(train_set.labels, device=device)
    model = build_model(config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=SGD_MOMENTUM)
    sampler = EpochSampler(len(train_set), config.batch_size, config.seed)
    step = 0
    if resume:
        assert checkpoint_path is not None  # checked above
        step = _restore(Checkpoint.load(checkpoint_path, config=config), model, optimizer, sampler)
        if stop_after_steps is not None and stop_after_steps <= step:
            raise ConfigurationError(f"stop_after_steps {stop_after_steps} is not after the checkpoint's step {step}")
    total_steps = sampler.steps_per_epoch * config.epochs

    while sampler.epoch < config.epochs:
        batch = sampler.next_batch().to(device)
        _train_step(model, optimizer, inputs[batch], targets[batch])
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
        heldout_accuracy=evaluate(model, heldout, device),
        steps=step,
        epochs_completed=sampler.epoch,
        device=str(device),
        environment=environment(device),
        state_dict={name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()},
        finished=sampler.epoch >= config.epochs,
    )


def evaluate(model: nn.Module, examples: Examples, device: torch.device) -> float:
    """Share of ``examples`` whose most likely class is their label (0..1)."""
    if len(examples) == 0:
        raise InvalidDataset("examples", "cannot evaluate on zero examples")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(examples.features, device=device))
    model.train(was_training)
    correct = (logits.argmax(dim=1).cpu() == torch.tensor(examples.labels)).sum().item()
    return correct / len(examples)


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
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


def _split(examples: Examples, holdout_percent: int) -> tuple[Examples, Examples]:
    train_set, heldout = examples.split(holdout_percent)
    if len(train_set) == 0 or len(heldout) == 0:
        raise InvalidDataset(
            "holdout_percent",
            f"{holdout_percent}% of {len(examples)} examples leaves {len(train_set)} to train on"
            f" and {len(heldout)} held out",
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
