"""Running one training job on one process, on ``N`` (``evp train --nproc N``), or as one rank under ``torchrun``.

Contract of :func:`run_job`:

1. a :class:`Job` names everything a rank needs and nothing it could not rebuild itself:
   the project folder and the recipe's declaration (imported again in each process), the
   config as JSON, the snapshot's shard folder with its recorded shards (each rank verifies
   and maps them itself, :class:`trainer.loader.ShardSet`), the checkpoint and the stop;
2. with ``nproc == 1`` the job trains here; with more, ``nproc`` fresh processes (spawned:
   nothing of this process's state leaks into them) join one process group on a free local
   port, rank ``r`` on ``cuda:r`` when the config asks for CUDA, and train together;
   rank 0 writes its result to a file this process reads back; a rank that fails fails the
   job, naming the rank;
3. under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment, see
   :func:`trainer.distributed.from_environment`) the job joins the group ``torchrun`` made
   and trains as that rank: no process is started.
"""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from events.errors import ConfigurationError, EvpError
from events.project import Project
from trainer.data import Column
from trainer.determinism import select_device
from trainer.distributed import SINGLE, World, from_environment, join, leave
from trainer.loader import ShardSet
from trainer.recipe import Recipe, load_recipe
from trainer.shards import ShardInfo
from trainer.training import TrainResult, train


@dataclass(frozen=True)
class Job:
    """Step 1: one training job, as every rank rebuilds it."""

    project: Path
    recipe: str  #: the recipe's declaration (``module:Class``) or its name in the project
    config_json: str
    folder: Path  #: the snapshot's shard folder
    shards: tuple[ShardInfo, ...]
    columns: tuple[Column, ...]
    owner: str  #: what the shards belong to, for messages (``snapshot snap-…``)
    checkpoint: Path | None = None
    resume: bool = False
    stop_after_steps: int | None = None
    workers: int = 0


def run_job(job: Job, nproc: int = 1, *, progress: Any = None) -> TrainResult:
    """Steps 2 and 3: train ``job`` on ``nproc`` processes (or as this ``torchrun`` rank); rank 0's result."""
    if nproc < 1:
        raise ConfigurationError(f"--nproc must be at least 1, got {nproc}")
    joined = from_environment()
    if joined is not None:
        if nproc != 1:
            raise ConfigurationError("under torchrun the world size is torchrun's (--nproc-per-node): leave --nproc out")
        return _as_rank(job, joined, None, progress)
    if nproc == 1:
        return _train(job, SINGLE, progress)
    with tempfile.TemporaryDirectory(prefix="evp-train-") as folder:
        return _spawn(job, nproc, Path(folder))


def _spawn(job: Job, nproc: int, folder: Path) -> TrainResult:
    """Step 2 for ``nproc`` > 1: one ``python -m trainer.launch`` per rank, whatever module the caller runs as
    (multiprocessing's spawn would import the caller's ``__main__`` again in every rank)."""
    (folder / "job.pkl").write_bytes(pickle.dumps(job))
    port = _free_port()
    ranks = []
    for rank in range(nproc):
        log = (folder / f"rank-{rank}.log").open("wb")
        ranks.append((subprocess.Popen([sys.executable, "-m", "trainer.launch", str(folder), str(rank), str(nproc),
                                        str(port)], stdout=log, stderr=subprocess.STDOUT), log))
    def failures() -> list[str]:
        return [f"rank {rank} exited with {process.returncode}" for rank, (process, _) in enumerate(ranks)
                if process.poll() not in (None, 0)]

    try:
        while any(process.poll() is None for process, _ in ranks) and not failures():
            time.sleep(0.05)
        failed = failures()
    finally:
        for process, log in ranks:
            if process.poll() is None:
                process.kill()  # one rank failed: the others would wait for it forever
            process.wait()
            log.close()
    if failed:
        tails = [(folder / f"rank-{r}.log").read_text(errors="replace").strip().splitlines()[-3:] for r in range(nproc)]
        shown = "; ".join(f"rank {r}: {' / '.join(t)}" for r, t in enumerate(tails) if t)
        raise EvpError(f"training on {nproc} processes failed ({', '.join(failed)}): {shown}")
    loaded: TrainResult = torch.load(folder / "result.pt", weights_only=False)
    return loaded


def _rank_main(folder: Path, rank: int, size: int, port: int) -> None:
    """One rank started by :func:`_spawn`: join the group, train, and (rank 0) write the result."""
    job: Job = pickle.loads((folder / "job.pkl").read_bytes())
    trained = _as_rank(job, World(rank, size), f"tcp://127.0.0.1:{port}", None)
    if rank == 0:
        torch.save(trained, folder / "result.pt")


def _as_rank(job: Job, world: World, address: str | None, progress: Any) -> TrainResult:
    recipe = load_recipe(Project.read(job.project), job.recipe)
    device = select_device(recipe.config_from_json(job.config_json).device)
    if device.type == "cuda":
        device = torch.device("cuda", world.rank % max(torch.cuda.device_count(), 1))
    joined = join(world, device, address=address)
    try:
        return _train(job, joined, progress, device, recipe)
    finally:
        leave()


def _train(job: Job, world: World, progress: Any, device: torch.device | None = None,
           recipe: Recipe[Any] | None = None) -> TrainResult:
    """Train ``job`` as ``world``'s rank (``recipe``: already imported by the caller, else imported here)."""
    recipe = recipe if recipe is not None else load_recipe(Project.read(job.project), job.recipe)
    rows = ShardSet.open(job.folder, job.shards, job.columns, owner=job.owner)
    return train(recipe, rows, recipe.config_from_json(job.config_json), checkpoint_path=job.checkpoint,
                 resume=job.resume, stop_after_steps=job.stop_after_steps, progress=progress, world=world,
                 workers=job.workers, device=device)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
