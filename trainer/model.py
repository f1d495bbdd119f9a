"""Building a recipe's model reproducibly, and the hash of its weights.

The weights hash is what a replay compares: two runs agree when their hashes agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from events.errors import ConfigurationError
from trainer.config import TrainConfig
from trainer.data import Rows
from trainer.recipe import Recipe


def build_model(recipe: Recipe[Any], config: TrainConfig, train: Rows) -> nn.Module:
    """The recipe's model, initialized from ``config.seed`` alone.

    Built on the CPU under a private copy of torch's RNG, so the initial weights are the
    same whatever ran before and whichever device the model moves to afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = recipe.model(config, train)
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"{type(recipe).__qualname__}.model must return a torch.nn.Module, got {model!r:.60}")
    return model


def weights_sha256(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict in a canonical form, hex-encoded.

    Tensors are taken in name order; each contributes its name, dtype, shape and the raw
    bytes of a contiguous CPU copy, every part length-prefixed so no two different state
    dicts can produce the same byte stream. Buffers (statistics a model keeps) count.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        for part in (name.encode(), str(tensor.dtype).encode(), repr(tuple(tensor.shape)).encode(), raw):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()
