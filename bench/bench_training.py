"""Deterministic, checkpointable training vs a plain in-memory tensor loop.

    python bench/bench_training.py [--small | --large]

``--small`` trains 10 epochs, the default 10 and 40, ``--large`` also 160, so the fixed
cost of a run (the split by row-id hash, the seeding, the held-out evaluation) and the
per-step cost show apart. Each path runs three times, interleaved; the fastest run counts.

Both train the same model on the same digits (scikit-learn's bundled 1,797 images) with
the same optimizer, batch size and epochs:

- evp: ``trainer.training.train`` with the digits example's ``MLP`` recipe — deterministic algorithms, one pinned CPU thread,
  rows sorted and split by a hash of their id, a seeded sampler, held-out evaluation;
  once more with a checkpoint every 50 steps; and once more with
  ``torch.utils.deterministic.fill_uninitialized_memory`` the other way round from
  ``trainer.determinism.FILL_UNINITIALIZED_MEMORY`` (what the NaN fill of every new
  uninitialized tensor costs, or saves);
- baseline: the loop people write first — tensors in memory, ``torch.randperm`` batches,
  no determinism switches, no checkpoints — on the same number of CPU threads as the
  deterministic run (``trainer.determinism.fixed_cpu_threads``), so the ratio is what
  determinism itself costs.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from _support import sizes_from, timed  # noqa: E402  (also puts the repo on sys.path)
from events.project import Project
from trainer.data import Column, Table
from trainer import determinism
from trainer.determinism import fixed_cpu_threads
from trainer.model import build_model
from trainer.recipe import Recipe, load_recipe
from trainer.training import train

EPOCHS = {"small": (10,), "default": (10, 40), "large": (10, 40, 160)}
REPEATS = 3  #: each path runs this many times, interleaved; the fastest run counts (the machine is shared)
DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def digits() -> Table:
    data = load_digits()
    return Table((Column("features", "float32", (64,)), Column("label", "int64")),
                 tuple(f"d{i:04d}" for i in range(len(data.target))),
                 {"features": data.data.astype(np.float32), "label": data.target.astype(np.int64)})


def plain_loop(recipe: Recipe[Any], table: Table, config: Any) -> None:
    model = build_model(recipe, config, table)
    optimizer = recipe.optimizer(config, model)
    inputs, targets = torch.tensor(table["features"]), torch.tensor(table["label"])
    for _ in range(config.epochs):
        for batch in torch.randperm(len(targets)).split(config.batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()


@contextmanager
def fill_uninitialized_memory(value: bool) -> Iterator[None]:
    """Train with ``fill_uninitialized_memory`` set to ``value`` (make_deterministic reads the constant)."""
    before = determinism.FILL_UNINITIALIZED_MEMORY
    determinism.FILL_UNINITIALIZED_MEMORY = value
    try:
        yield
    finally:
        determinism.FILL_UNINITIALIZED_MEMORY = before


def main(argv: Sequence[str] | None = None) -> int:
    sizes = sizes_from(argv, __doc__, EPOCHS)
    examples = digits()
    recipe = load_recipe(Project.read(DIGITS), "mlp")  # the digits example's MLP
    config = recipe.config(epochs=1, device="cpu")
    train(recipe, examples, config)  # warm-up: first deterministic call imports torch's compiler
    train_rows, _ = examples.split(config.holdout_percent)
    print(f"### training on the digits ({len(train_rows):,} training rows, batches of {config.batch_size}, CPU;"
          f" best of {REPEATS})")
    print()
    print("| epochs | steps | path | steps/s | µs per step | ratio to plain loop |")
    print("|---:|---:|---|---:|---:|---:|")
    other = "off" if determinism.FILL_UNINITIALIZED_MEMORY else "on"
    for epochs in sizes:
        sized = replace(config, epochs=epochs)
        runs: dict[str, list[float]] = {"plain": [], "evp": [], "checkpointed": [], "fill": []}
        for _ in range(REPEATS):
            with fixed_cpu_threads():  # the same thread count as the deterministic run: a fair baseline
                runs["plain"].append(timed(lambda: plain_loop(recipe, train_rows, sized)))
            runs["evp"].append(timed(lambda: train(recipe, examples, sized)))
            with tempfile.TemporaryDirectory() as folder:
                runs["checkpointed"].append(timed(lambda: train(recipe, examples, replace(sized, checkpoint_every=50),
                                                                checkpoint_path=Path(folder) / "run.pt")))
            with fill_uninitialized_memory(not determinism.FILL_UNINITIALIZED_MEMORY):
                runs["fill"].append(timed(lambda: train(recipe, examples, sized)))
        steps = epochs * -(-len(train_rows) // config.batch_size)
        baseline = min(runs["plain"])
        for name, key in (("plain in-memory loop (baseline)", "plain"), ("evp deterministic train", "evp"),
                          ("evp with a checkpoint every 50 steps", "checkpointed"),
                          (f"evp with fill_uninitialized_memory {other}", "fill")):
            took = min(runs[key])
            print(f"| {epochs} | {steps:,} | {name} | {steps / took:,.0f} | {took / steps * 1e6:,.0f} | {baseline / took:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
