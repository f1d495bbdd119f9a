"""The checkpoint contract: everything a resumed run needs to continue bit for bit.

A checkpoint holds the model and optimizer state, every random generator's state
(Python, NumPy, torch CPU, CUDA when used, and the sampler's own generator) and the
sampler's position: the epoch, the step within it and that epoch's permutation. It is
written to a temporary file in the same directory and renamed over the old one, so a
crash mid-write leaves the previous checkpoint intact and never a partial file.

The file is a ``torch.save`` of plain containers, tensors and numbers only, and is read
back with ``weights_only=True``: loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from events.errors import ConfigurationError, IntegrityError, NotFound
from events.adapters.files import write_atomically
from trainer.config import TrainConfig
from trainer.model import weights_sha256

#: Bump when the layout below changes. 2: every rank's generators, the world size and backend.
FORMAT_VERSION = 2
#: Versions a loader reads (a version-1 checkpoint is one process's).
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class RngStates:
    """Every random generator a run touches, captured at one instant."""

    python: tuple[Any, ...]
    numpy: dict[str, Any]
    torch_cpu: torch.Tensor
    torch_cuda: tuple[torch.Tensor, ...]  # empty when CUDA is not in use
    sampler: torch.Tensor

    @classmethod
    def capture(cls, sampler: torch.Generator, *, cuda: bool) -> RngStates:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return cls(
            python=random.getstate(),
            # NumPy's state holds an ndarray, which weights_only loading refuses: keep plain parts.
            numpy={"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            torch_cpu=torch.get_rng_state(),
            torch_cuda=tuple(torch.cuda.get_rng_state_all()) if cuda else (),
            sampler=sampler.get_state(),
        )

    def restore_globals(self) -> None:
        """Put the global generators back (CUDA's only when CUDA is available now).

        The sampler's generator goes back with its position, in ``EpochSampler.restore``.
        """
        random.setstate(self.python)
        n = self.numpy
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(self.torch_cuda))


@dataclass(frozen=True)
class Checkpoint:
    """A run's complete state after ``global_step`` optimizer steps.

    ``epoch``/``step_in_epoch`` is the sampler's position: the next batch is step
    ``step_in_epoch`` of ``permutation`` (``None`` at an epoch boundary, where the next
    epoch's permutation has not been drawn yet). Every data-parallel rank is at the same
    position with the same permutation; ``ranks`` holds each rank's generators, in rank order
    (one entry for a single process), and ``world_size``/``backend`` the run's process group.
    """

    config_json: str
    epoch: int
    step_in_epoch: int
    global_step: int
    permutation: torch.Tensor | None
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    ranks: tuple[RngStates, ...]
    environment: dict[str, Any]
    world_size: int = 1
    backend: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def rng(self) -> RngStates:
        """Rank 0's generators (the only ones of a single process)."""
        return self.ranks[0]

    def save(self, path: Path) -> None:
        """Write atomically: temp file in the same directory, fsync, rename, fsync the directory."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": self.format_version,
            "config_json": self.config_json,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "permutation": self.permutation,
            "model": {name: tensor.detach().to("cpu") for name, tensor in self.model.items()},
            "model_sha256": weights_sha256(self.model),
            "optimizer": self.optimizer,
            "rng": _rng_payload(self.rng),
            "ranks": [_rng_payload(r) for r in self.ranks],
            "world_size": self.world_size,
            "backend": self.backend,
            "environment": self.environment,
        }
        write_atomically(path, lambda file: torch.save(payload, file))

    @classmethod
    def load(cls, path: Path, *, config: TrainConfig) -> Checkpoint:
        """Read a checkpoint written for exactly ``config``; refuse anything else, saying what differs."""
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"checkpoint {path} does not exist")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a truncated or foreign file
            raise IntegrityError(f"checkpoint {path} is not a readable checkpoint: {err}") from err
        if not isinstance(payload, dict) or payload.get("format_version") not in READABLE_VERSIONS:
            found = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
            raise IntegrityError(f"checkpoint {path} has format_version {found!r}; this version reads {READABLE_VERSIONS}")
        missing = sorted(_FIELDS - set(payload))
        if missing:
            raise IntegrityError(f"checkpoint {path} lacks field(s) {missing}")
        differences = type(config).from_json(payload["config_json"]).differences(config)
        if differences:
            shown = ", ".join(f"{name}: checkpoint {old!r}, now {new!r}" for name, (old, new) in differences.items())
            raise ConfigurationError(f"checkpoint {path} was written with a different config ({shown})")
        if weights_sha256(payload["model"]) != payload["model_sha256"]:
            raise IntegrityError(f"checkpoint {path}: model weights do not match their recorded model_sha256")
        ranks = payload.get("ranks") or [payload["rng"]]
        return cls(
            config_json=payload["config_json"],
            epoch=payload["epoch"],
            step_in_epoch=payload["step_in_epoch"],
            global_step=payload["global_step"],
            permutation=payload["permutation"],
            model=payload["model"],
            optimizer=payload["optimizer"],
            ranks=tuple(RngStates(python=r["python"], numpy=r["numpy"], torch_cpu=r["torch_cpu"],
                                  torch_cuda=tuple(r["torch_cuda"]), sampler=r["sampler"]) for r in ranks),
            environment=payload["environment"],
            world_size=int(payload.get("world_size", 1)),
            backend=str(payload.get("backend", "")),
            format_version=int(payload["format_version"]),
        )

    def for_world(self, world_size: int, path: Path) -> None:
        """ConfigurationError unless this checkpoint was written by ``world_size`` ranks.

        The batches each rank takes and the order gradients are summed in depend on the
        world size, so a resume under another one could not end where the run would have.
        """
        if world_size != self.world_size or len(self.ranks) != world_size:
            raise ConfigurationError(
                f"checkpoint {path} was written by {self.world_size} process(es); resuming it with {world_size} is "
                f"refused: each rank's batches and the gradient reduction depend on the world size (resume with "
                f"--nproc {self.world_size}, or start a new run)"
            )


def _rng_payload(rng: RngStates) -> dict[str, Any]:
    return {"python": rng.python, "numpy": rng.numpy, "torch_cpu": rng.torch_cpu, "torch_cuda": list(rng.torch_cuda),
            "sampler": rng.sampler}


_FIELDS = frozenset({"config_json", "epoch", "step_in_epoch", "global_step", "permutation", "model",
                     "model_sha256", "optimizer", "rng", "environment"})
