"""Data-parallel training: which rank this process is, its process group, and what ranks share.

One process trains alone (:data:`SINGLE`); ``N`` processes train one model together with
``torch.nn.parallel.DistributedDataParallel``, gloo on the CPU and NCCL on CUDA. Contract:

1. :func:`join` starts this process's part of a group: from explicit rank, size and address
   (what :mod:`trainer.launch` passes to the processes it starts) or from the variables
   ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
2. every rank builds the same model from the same seed and takes its slice of each batch
   (:class:`trainer.data.EpochSampler`); DDP averages the gradients, so all ranks hold the
   same weights after every step;
3. what one rank must know of the others (their generators, for a checkpoint) is gathered to
   rank 0 with :func:`gather`; only rank 0 writes checkpoints and records the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from events.errors import ConfigurationError


@dataclass(frozen=True)
class World:
    """This process's place in its group: ``rank`` of ``size``, talking over ``backend``."""

    rank: int = 0
    size: int = 1
    backend: str = ""

    @property
    def first(self) -> bool:
        """Rank 0: the one that checkpoints, reports progress and records the run."""
        return self.rank == 0


SINGLE = World()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def from_environment() -> World | None:
    """The world ``torchrun`` describes in the environment, or None outside one (or in a world of one)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
    except ValueError as err:
        raise ConfigurationError(f"WORLD_SIZE/RANK must be whole numbers: {err}") from err
    return World(rank, size) if size > 1 else None


def join(world: World, device: torch.device, *, address: str | None = None) -> World:
    """Step 1: join the process group (``address`` ``tcp://host:port``, or the environment's); the world with its backend."""
    backend = backend_for(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=address or "env://", rank=world.rank, world_size=world.size)
    return World(world.rank, world.size, backend)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """Step 2: the model as this rank trains it (DDP across a group; itself alone)."""
    if world.size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


def unwrapped(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    assert isinstance(inner, nn.Module)
    return inner


def gather(value: Any, world: World) -> list[Any]:
    """Step 3: every rank's ``value`` on rank 0, in rank order (other ranks get an empty list)."""
    if world.size == 1:
        return [value]
    found: list[Any] | None = [None] * world.size if world.first else None
    dist.gather_object(value, found, dst=0)
    return found or []

