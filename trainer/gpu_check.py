"""Check exactness on a GPU machine from a snapshot's shard folder alone.

    python -m trainer.gpu_check SNAPSHOT_DIR --recipe module:Class [--project DIR] [--epochs N]
                                [--set KEY=VALUE ...] [--allow-cpu] [--json]

Needs no Kafka and no PostgreSQL: only the folder ``evp snapshot create`` wrote
(``manifest.json`` and the shard files) and the recipe's code. The contract:

1. read the manifest and every shard it lists, each checked against its recorded sha256,
   columns and row count, and the rows against the snapshot's content hash
   (:func:`trainer.snapshot.check_shards`, which reads them with :mod:`trainer.shards`); any
   difference is named and the check exits 1;
2. load the recipe: ``module:Class`` imported with the working directory on ``sys.path``,
   or a recipe name (or spec) of the ``--project`` folder's ``evp.toml``;
3. pick the device: CUDA (``cuda``); without it say so and exit 2, unless ``--allow-cpu``,
   which runs the same checks on the CPU;
4. train with :func:`trainer.training.train` and the recipe's config (``--epochs``,
   ``--set``), after one untimed warm-up step, three times from scratch: twice straight
   through (once from the rows in memory, once streamed from the memory-mapped shards as
   :mod:`trainer.loader` reads them), and once streamed, stopped after half the steps (a
   checkpoint) and resumed from that checkpoint in a call of its own;
5. while each run trains, sample the GPU's utilisation in a background thread
   (``torch.cuda.utilization``, which needs NVML's Python bindings, else ``nvidia-smi``);
6. print the three weight hashes, each run's steps/s, the utilisation (mean and max of the
   samples) and the environment the runs recorded (``--json``: one object); exit 0 when the
   three hashes agree, 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from events.errors import ConfigurationError, EvpError
from events.project import Project
from trainer.config import TrainConfig
from trainer.data import Table
from trainer.loader import ShardSet
from trainer.recipe import Recipe, load_recipe
from trainer.snapshot import MANIFEST, check_shards, read_manifest_file
from trainer.training import TrainResult, train

USAGE = 2  #: exit status without CUDA (and without --allow-cpu), or for a bad argument
MISMATCH = 1  #: exit status when the weights, or the shards, are not what they should be
SAMPLE_EVERY = 0.2  #: seconds between utilisation samples


class UtilisationSampler:
    """Samples a CUDA device's utilisation (percent) in a background thread while in use.

    Reads ``torch.cuda.utilization`` and, when that fails (no NVML bindings), ``nvidia-smi``;
    when both fail it stops and :attr:`samples` stays empty.
    """

    def __init__(self, device: torch.device, every: float = SAMPLE_EVERY) -> None:
        self.index = device.index if device.index is not None else 0
        self.every = every
        self.samples: list[float] = []
        self._read: Callable[[], float] | None = self._from_torch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-utilisation", daemon=True)

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            value = self._sample()
            if value is None:
                return
            self.samples.append(value)

    def _sample(self) -> float | None:
        while self._read is not None:
            try:
                return self._read()
            except Exception:  # no NVML bindings, no nvidia-smi, no answer: try the next way
                self._read = self._from_nvidia_smi if self._read == self._from_torch else None
        return None

    def _from_torch(self) -> float:
        return float(torch.cuda.utilization(self.index))

    def _from_nvidia_smi(self) -> float:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 f"--id={self.index}"], capture_output=True, text=True, timeout=5, check=True)
        return float(answer.stdout.strip().splitlines()[0])


@dataclass
class Run:
    """One of the three trainings and what it measured."""

    name: str
    result: TrainResult
    seconds: float
    utilisation: list[float] = field(default_factory=list)

    @property
    def steps_per_second(self) -> float:
        return self.result.steps / self.seconds if self.seconds else math.inf

    def utilisation_text(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "GPU n/a (CPU)"
        if not self.utilisation:
            return "GPU utilisation unavailable (no NVML bindings, no nvidia-smi)"
        return f"GPU {sum(self.utilisation) / len(self.utilisation):.0f}% mean, {max(self.utilisation):.0f}% max"

    def to_json(self) -> dict[str, Any]:
        samples = self.utilisation
        return {"name": self.name, "weights_sha256": self.result.weights_sha256, "steps": self.result.steps,
                "seconds": self.seconds, "steps_per_second": self.steps_per_second,
                "gpu_utilisation": {"samples": len(samples),
                                    "mean": sum(samples) / len(samples) if samples else None,
                                    "max": max(samples) if samples else None}}


def _timed(device: torch.device, name: str, *parts: Callable[[], TrainResult]) -> Run:
    """Run ``parts`` in order (one training, maybe in two calls), sampling the GPU while they do."""
    samples: list[float] = []
    started = time.perf_counter()
    result: TrainResult | None = None
    for part in parts:
        if device.type == "cuda":
            with UtilisationSampler(device) as sampler:
                result = part()
                torch.cuda.synchronize(device)
            samples.extend(sampler.samples)
        else:
            result = part()
    assert result is not None  # parts is never empty
    return Run(name, result, time.perf_counter() - started, samples)


def three_runs(recipe: Recipe[Any], table: Table, config: TrainConfig, folder: Path,
               streamed: ShardSet | None = None) -> list[Run]:
    """Step 4: twice from scratch, once stopped at half the steps and resumed; in this order.

    Run 1 trains on the rows in memory; runs 2 and 3 on ``streamed`` (the same shards
    memory-mapped, batches gathered as a large snapshot would be) when it is given, so equal
    hashes also prove the two paths equal on this device. One step is trained first and not
    timed: the first call pays torch's one-time costs (imports, the CUDA context, loading
    kernels), which would count against run 1 alone.
    """
    rows: Table | ShardSet = streamed if streamed is not None else table
    device = torch.device(config.device)
    path = folder / "checkpoint.pt"
    train(recipe, table, config, checkpoint_path=folder / "warm-up.pt", stop_after_steps=1)
    along = path if config.checkpoint_every else None  # a config that checkpoints needs a place for them
    first = _timed(device, "run 1 (from scratch)", lambda: train(recipe, table, config, checkpoint_path=along))
    second = _timed(device, "run 2 (from scratch, streamed from the shards)" if streamed is not None else
                    "run 2 (from scratch)", lambda: train(recipe, rows, config, checkpoint_path=along))
    middle = first.result.steps // 2
    if middle < 1:
        raise ConfigurationError(f"a run of {first.result.steps} step(s) cannot be stopped halfway: "
                                 "train for more epochs (--epochs)")
    path.unlink(missing_ok=True)
    resumed = _timed(device, f"run 3 (stopped at step {middle}, resumed)",
                     lambda: train(recipe, rows, config, checkpoint_path=path, stop_after_steps=middle),
                     lambda: train(recipe, rows, config, checkpoint_path=path, resume=True))
    return [first, second, resumed]


def _device_name(allow_cpu: bool) -> str | None:
    """Step 3: "cuda" when CUDA is available, "cpu" with ``allow_cpu``, None otherwise."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if allow_cpu else None


def _recipe(spec: str, project_folder: Path | None) -> Recipe[Any]:
    """Step 2: a project's recipe, or ``module:Class`` importable from the working directory."""
    project = Project.read(project_folder) if project_folder is not None else Project(Path.cwd(), "gpu-check")
    return load_recipe(project, spec)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.gpu_check",
                                     description="Train a recipe three times on a snapshot's shard folder (twice "
                                                 "from scratch, once interrupted and resumed) and compare the "
                                                 "weights bit for bit; no Kafka or PostgreSQL needed.")
    parser.add_argument("snapshot_dir", type=Path, help=f"a snapshot's folder: its {MANIFEST} and shard files")
    parser.add_argument("--recipe", required=True, help="module:Class (importable from here), or a --project name")
    parser.add_argument("--project", type=Path, help="a folder with an evp.toml whose recipes --recipe may name")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one field of the recipe's config (repeatable)")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the same checks on the CPU")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Steps 1-6 of the module docstring; returns the exit status."""
    args = _parser().parse_args(argv)
    device_name = _device_name(args.allow_cpu)
    if device_name is None:
        print(f"CUDA is not available on this machine (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}): this check is for a GPU; pass --allow-cpu to run it on the CPU",
              file=sys.stderr)
        return USAGE
    try:
        manifest = read_manifest_file(args.snapshot_dir / MANIFEST)
        table = check_shards(args.snapshot_dir, manifest)
        recipe = _recipe(args.recipe, args.project)
        epochs = [] if args.epochs is None else [f"epochs={args.epochs}"]
        config = recipe.parse_config([*args.set, *epochs, f"device={device_name}"])
        with tempfile.TemporaryDirectory(prefix="evp-gpu-check-") as folder:
            streamed = ShardSet.open(args.snapshot_dir, manifest.shards, manifest.columns,
                                     owner=f"snapshot {manifest.snapshot_id}")
            runs = three_runs(recipe, table, config, Path(folder), streamed)
    except ConfigurationError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return USAGE
    except EvpError as err:  # a shard or the manifest is not what the snapshot recorded, or missing
        print(f"gpu_check: {err}", file=sys.stderr)
        return MISMATCH
    identical = len({run.result.weights_sha256 for run in runs}) == 1
    device = torch.device(config.device)
    if args.json:
        print(json.dumps({"snapshot_id": manifest.snapshot_id, "rows": len(table), "shards": len(manifest.shards),
                          "recipe": args.recipe, "config": json.loads(config.to_json()), "device": runs[0].result.device,
                          "environment": runs[0].result.environment, "runs": [run.to_json() for run in runs],
                          "identical": identical}, indent=2, sort_keys=True))
    else:
        _print_report(manifest.snapshot_id, table, len(manifest.shards), runs, device, identical)
    return 0 if identical else MISMATCH


def _print_report(snapshot_id: str, table: Table, shards: int, runs: list[Run], device: torch.device,
                  identical: bool) -> None:
    env = runs[0].result.environment
    print(f"snapshot {snapshot_id}: {len(table):,} rows in {shards} shard(s), every shard's sha256 and the content "
          "hash verified")
    hardware = (f"{env.get('gpu_name') or env.get('device_name')}, driver {env.get('gpu_driver') or '?'}, "
                f"CUDA {env.get('cuda') or '?'}" if device.type == "cuda" else env.get("cpu_model", "CPU"))
    print(f"device {runs[0].result.device} ({hardware}), torch {env.get('torch')}")
    width = max(len(run.name) for run in runs)
    for run in runs:
        print(f"{run.name + ':':<{width + 1}} {run.result.weights_sha256}  {run.result.steps:,} steps, "
              f"{run.steps_per_second:,.0f} steps/s, {run.utilisation_text(device)}")
    if identical:
        print("identical: the three weight hashes agree")
    else:
        print("MISMATCH: the weight hashes differ; the environment the runs recorded:", file=sys.stderr)
        print(json.dumps(env, indent=2, sort_keys=True), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
