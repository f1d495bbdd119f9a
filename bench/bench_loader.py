"""Training from snapshot shards on disk vs from memory, and two data-parallel processes vs one.

    python bench/bench_loader.py [--small | --large]

Rows are synthetic (64 float32 features, a label from a fixed random linear teacher, seed
7), 100,000 of them by default (``--small`` 20,000, ``--large`` also 1,000,000), written as a
snapshot's shards (1,024 rows each). Each path trains the digits example's ``MLP`` recipe
(batches of 256, 5 epochs, one CPU thread per process) and runs twice, interleaved; the
faster run counts:

- baseline: the loop people write first, all rows as tensors in memory, ``torch.randperm``
  batches, no determinism switches;
- evp from memory: ``trainer.training.train`` on a ``Table``;
- evp from shards: the same on a ``ShardSet`` (every shard hashed first, rows memory-mapped,
  each batch gathered from the files), without and with 2 prefetching workers;
- evp data-parallel: ``trainer.launch.run_job`` on 1 and on 2 processes (gloo), start-up of
  the processes included (what a user waits for).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from _support import sizes_from, timed  # noqa: E402  (also puts the repo on sys.path)
from bench_training import DIGITS, plain_loop
from events.project import Project
from trainer.data import Column, Table
from trainer.determinism import fixed_cpu_threads
from trainer.launch import Job, run_job
from trainer.loader import ShardSet
from trainer.recipe import load_recipe
from trainer.shards import write_shards
from trainer.training import train

SIZES = {"small": (20_000,), "default": (100_000,), "large": (100_000, 1_000_000)}
COLUMNS = (Column("features", "float32", (64,)), Column("label", "int64"))
REPEATS = 2
EPOCHS = 5


def synthetic(rows: int, seed: int = 7) -> Table:
    rng = np.random.default_rng(seed)
    features = rng.uniform(0, 16, size=(rows, 64)).astype(np.float32)
    teacher = rng.normal(size=(64, 10)).astype(np.float32)
    return Table(COLUMNS, tuple(f"r{i:07d}" for i in range(rows)),
                 {"features": features, "label": np.argmax(features @ teacher, axis=1).astype(np.int64)})


def main(argv: Sequence[str] | None = None) -> int:
    sizes = sizes_from(argv, __doc__, SIZES)
    recipe = load_recipe(Project.read(DIGITS), "mlp")
    config = recipe.config(epochs=EPOCHS, batch_size=256, device="cpu")
    print("### training from shards and on two processes (digits MLP, batches of 256, 5 epochs, CPU; best of "
          f"{REPEATS})")
    print()
    print("| rows | path | seconds | steps/s | rows/s | ratio to its baseline |")
    print("|---:|---|---:|---:|---:|---:|")
    for count in sizes:
        table = synthetic(count)
        train_rows, _ = table.split(config.holdout_percent)
        with tempfile.TemporaryDirectory() as folder:
            infos = tuple(write_shards(table, Path(folder)))
            job = Job(DIGITS, "mlp", config.to_json(), Path(folder), infos, COLUMNS, "snapshot bench")
            def shards() -> ShardSet:
                return ShardSet.open(Path(folder), infos, COLUMNS, owner="bench")

            runs = {
                "evp from memory (Table)": lambda: train(recipe, table, config),
                "evp from shards (verified, cached, mapped)": lambda: train(recipe, shards(), config),
                "evp from shards, 2 prefetching workers": lambda: train(recipe, shards(), config, workers=2),
                "evp run_job, 1 process": lambda: run_job(job, 1),
                "evp run_job, 2 processes (DDP, gloo)": lambda: run_job(job, 2),
            }
            best = {"plain in-memory loop (baseline)": min(timed(lambda: _plain(recipe, train_rows, config))
                                                           for _ in range(REPEATS))}
            steps_only: dict[str, float] = {}
            for name, work in runs.items():
                whole, loop = [], []
                for _ in range(REPEATS):
                    result: list[Any] = []
                    whole.append(timed(lambda: result.append(work())))
                    loop.append(result[0].seconds)
                best[name], steps_only[name] = min(whole), min(loop)
        steps = config.epochs * (len(train_rows) // config.batch_size)
        plain = best["plain in-memory loop (baseline)"]
        for name, took in best.items():
            rows = [(name, took, plain)]
            if name in steps_only:  # the steps alone: what a longer run converges to
                baseline = steps_only["evp run_job, 1 process"] if "run_job" in name else plain
                rows.append((f"{name}, steps only", steps_only[name], baseline))
            for label, seconds, against in rows:
                print(f"| {count:,} | {label} | {seconds:.2f} | {steps / seconds:,.0f} | "
                      f"{steps * config.batch_size / seconds:,.0f} | {against / seconds:.2f}x |", flush=True)
    return 0


def _plain(recipe, rows, config):  # type: ignore[no-untyped-def]
    with fixed_cpu_threads():  # the same thread count as the deterministic run: a fair baseline
        plain_loop(recipe, rows, config)


if __name__ == "__main__":
    sys.exit(main())
