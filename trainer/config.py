"""Training configuration: every choice that changes the weights, and nothing else.

:class:`TrainConfig` holds the choices evp itself makes for every recipe (seed, epochs,
batch size, held-out share, device, checkpoint interval). A recipe's config is a frozen
dataclass that subclasses it and adds the recipe's own hyperparameters (and may change
the defaults)::

    @dataclass(frozen=True)
    class WideConfig(TrainConfig):
        epochs: int = 20
        learning_rate: float = 0.01
        hidden: int = 256

Every field's value is checked against its annotation (``int``, ``float``, ``str``,
``bool``) when the config is built, naming the field. A config travels as canonical JSON
(sorted keys, no whitespace) so its text, and any hash of it, is the same wherever it was
written; unknown keys are refused, naming them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from events.errors import ConfigurationError

_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")
C = TypeVar("C", bound="TrainConfig")


@dataclass(frozen=True)
class TrainConfig:
    """What evp needs of every run.

    ``holdout_percent`` of the rows (chosen by a hash of their row id, see
    :meth:`trainer.data.Table.split`) are held out for the metrics. ``checkpoint_every``
    saves a checkpoint every that many steps (0: never); it does not change the weights.
    """

    seed: int = 1234
    epochs: int = 10
    batch_size: int = 64
    holdout_percent: int = 20
    device: str = "auto"
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _checked_type(f.name, getattr(self, f.name), hints.get(f.name))
            object.__setattr__(self, f.name, value)
        _check_range("seed", self.seed, low=0, high=2**63 - 1)
        _check_range("epochs", self.epochs, low=1)
        _check_range("batch_size", self.batch_size, low=1)
        _check_range("holdout_percent", self.holdout_percent, low=1, high=99)
        _check_range("checkpoint_every", self.checkpoint_every, low=0)
        check_device_name(self.device)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; equal configs give equal text."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_mapping(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a mapping; missing fields take their defaults, an unknown key is refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"{cls.__name__} has no field {unknown[0]!r}"
                                     f"{f' (nor {unknown[1:]})' if len(unknown) > 1 else ''}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Parse :meth:`to_json` output (see :meth:`from_mapping`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigurationError(f"training config is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigurationError(f"training config must be a JSON object, got {type(data).__name__}")
        return cls.from_mapping(data)

    @classmethod
    def from_assignments(cls: type[C], assignments: Iterable[str]) -> C:
        """Parse ``key=value`` strings (``--set``) by each field's type; refuse unknown keys by name.

        ``bool`` fields take true/false/1/0/yes/no; ``int`` and ``float`` parse as Python does.
        """
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for text in assignments:
            key, sep, raw = text.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigurationError(f"--set {text!r}: expected key=value")
            if key not in known:
                raise ConfigurationError(f"--set {key}: {cls.__name__} has no field {key!r}; known: {sorted(known)}")
            values[key] = _parse(key, raw.strip(), hints.get(key))
        return cls.from_mapping(values)

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{name: (self's, other's)}``; empty when equal."""
        mine, theirs = asdict(self), asdict(other)
        return {name: (mine.get(name), theirs.get(name)) for name in sorted(set(mine) | set(theirs))
                if mine.get(name) != theirs.get(name)}


def check_device_name(name: object) -> str:
    """Refuse anything but "auto", "cpu", "cuda" or "cuda:N"."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise ConfigurationError(f"device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', got {name!r}")
    return name


def is_config_class(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, TrainConfig) and dataclasses.is_dataclass(cls)


def _checked_type(name: str, value: object, hint: object) -> object:
    # bool is an int subclass; True as an epoch count is a bug, not a 1.
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{name} must be a whole number, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name} must be true or false, got {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigurationError(f"{name} must be a string, got {value!r}")
    else:
        raise ConfigurationError(f"{name}: a config field must be int, float, bool or str, not {hint!r}")
    return value


def _parse(name: str, raw: str, hint: object) -> object:
    try:
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is bool:
            truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            return truth[raw.lower()]
    except (ValueError, KeyError):
        kind = getattr(hint, "__name__", str(hint))
        raise ConfigurationError(f"--set {name}={raw}: not a valid {kind}") from None
    return raw


def _check_range(name: str, value: int, *, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ConfigurationError(f"{name} must be {bounds}, got {value}")
