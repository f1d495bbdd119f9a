"""The training configuration: every choice that changes the weights, and nothing else.

A run is identified by (snapshot, config, environment). The config travels as canonical
JSON (sorted keys, no whitespace) so that its text, and any hash of it, is the same
wherever it was written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from events.errors import ConfigurationError

_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a run. The optimizer is fixed: SGD with momentum 0.9.

    ``holdout_percent`` of the examples (chosen by a hash of their sample id, see
    :meth:`trainer.data.Examples.split`) are held out for evaluation.
    ``checkpoint_every`` saves a checkpoint every that many steps (0: never); it does not
    change the weights.
    """

    seed: int = 1234
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 0.05
    hidden: int = 128
    holdout_percent: int = 20
    device: str = "auto"
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        _check_int("seed", self.seed, low=0, high=2**63 - 1)
        _check_int("epochs", self.epochs, low=1)
        _check_int("batch_size", self.batch_size, low=1)
        _check_int("hidden", self.hidden, low=1)
        _check_int("holdout_percent", self.holdout_percent, low=1, high=99)
        _check_int("checkpoint_every", self.checkpoint_every, low=0)
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ConfigurationError(f"learning_rate must be a positive finite number, got {rate!r}")
        object.__setattr__(self, "learning_rate", float(rate))
        check_device_name(self.device)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; equal configs give equal text."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Parse :meth:`to_json` output. Missing fields take their defaults; unknown ones are refused."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigurationError(f"training config is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigurationError(f"training config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"training config has unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{name: (self's, other's)}``; empty when equal."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }


def check_device_name(name: object) -> str:
    """Refuse anything but "auto", "cpu", "cuda" or "cuda:N"."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise ConfigurationError(f"device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', got {name!r}")
    return name


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    # bool is an int subclass; True as an epoch count is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ConfigurationError(f"{name} must be {bounds}, got {value}")
