"""The model: a small MLP over the 64 raw pixel intensities, and a hash of its weights.

The weights hash is what a replay compares: two runs agree when their hashes agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.data import CLASSES, FEATURE_MAX, FEATURES


class ScaleFeatures(nn.Module):
    """Divides the raw 0..16 intensities by 16, inside the model.

    Keeping the scaling in the model (not in the data pipeline) means the snapshot's
    values go in unchanged, at training and at inference alike. Division by a power of
    two is exact in floating point. It has no state, so it adds nothing to the weights.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features / FEATURE_MAX


def build_model(config: TrainConfig) -> nn.Sequential:
    """64 -> hidden -> hidden -> 10 logits, initialized from ``config.seed`` alone.

    Built on the CPU under a private copy of torch's RNG, so the initial weights are the
    same whatever ran before and whichever device the model moves to afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return nn.Sequential(
            ScaleFeatures(),
            nn.Linear(FEATURES, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, CLASSES),
        )


def weights_sha256(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict in a canonical form, hex-encoded.

    Tensors are taken in name order; each contributes its name, dtype, shape and the raw
    bytes of a contiguous CPU copy, every part length-prefixed so no two different state
    dicts can produce the same byte stream.
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
