"""The recipe API: a project says what to learn; evp makes every run exact and recorded.

A recipe is a class::

    @dataclass(frozen=True)
    class LinearConfig(TrainConfig):     # evp's fields (seed, epochs, ...) plus the recipe's
        epochs: int = 50
        learning_rate: float = 0.1

    class Linear(Recipe[LinearConfig]):
        config = LinearConfig
        inputs = "features"              # the column fed to the model
        target = "target"                # the column the loss compares against

        def model(self, config: LinearConfig, train: Table) -> nn.Module:
            return nn.Linear(train.column("features").shape[0], 1)

        def optimizer(self, config: LinearConfig, model: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.SGD(model.parameters(), lr=config.learning_rate)

        def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(outputs.squeeze(1), targets)

        def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
            return {"rmse": F.mse_loss(outputs.squeeze(1), targets).sqrt().item()}

What the recipe owns: the model, the optimizer, the loss and the metrics (so
classification and regression are alike to evp). What evp owns, for every recipe
(:mod:`trainer.training`):

1. the determinism switches and the fixed CPU thread count;
2. the held-out split, by a hash of each row id (``config.holdout_percent``);
3. building the model on the CPU under a private RNG seeded with ``config.seed``, so the
   initial weights depend on the seed alone; ``model`` gets the training split, from
   which it may compute statistics (kept as buffers, they are part of the weights);
4. the seeded, resumable batch order; checkpoints with every RNG state; the weights hash;
5. ``metrics`` on the held-out split after training, as a map of name to float.

``model``, ``optimizer``, ``loss`` and ``metrics`` must be deterministic given their
inputs and torch's seeded generators.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from events.errors import ConfigurationError, InvalidDataset
from events.project import Project
from trainer.config import TrainConfig, is_config_class
from trainer.data import Columned, Rows

C = TypeVar("C", bound=TrainConfig)


class Recipe(Generic[C]):
    """Base class of a project's recipes; see the module docstring for the contract."""

    config: ClassVar[type[Any]]
    inputs: ClassVar[str] = "features"
    target: ClassVar[str] = "label"

    def model(self, config: C, train: Rows) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, config: C, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    @classmethod
    def check(cls) -> None:
        """Validate the declaration, naming the attribute at fault."""
        label = f"recipe {cls.__module__}:{cls.__qualname__}"
        if not is_config_class(getattr(cls, "config", None)):
            raise ConfigurationError(f"{label}: config must be a dataclass subclassing trainer.config.TrainConfig")
        for name in ("model", "optimizer", "loss", "metrics"):
            if getattr(cls, name) is getattr(Recipe, name):
                raise ConfigurationError(f"{label}: does not define {name}()")
        for name in ("inputs", "target"):
            if not isinstance(getattr(cls, name), str):
                raise ConfigurationError(f"{label}: {name} must name a column")

    def check_table(self, table: Columned) -> None:
        """The columns the recipe reads must exist."""
        names = [c.name for c in table.columns]
        for role in ("inputs", "target"):
            column = getattr(self, role)
            if column not in names:
                raise InvalidDataset(column, f"recipe {type(self).__qualname__} reads column {column!r} as its "
                                             f"{role}; the snapshot has {names}")

    def default_config(self) -> C:
        config: C = self.config()
        return config

    def parse_config(self, assignments: list[str]) -> C:
        config: C = self.config.from_assignments(assignments)
        return config

    def config_from_json(self, text: str) -> C:
        config: C = self.config.from_json(text)
        return config


def checked_metrics(recipe: Recipe[Any], values: object) -> dict[str, float]:
    """The recipe's metrics as ``{name: float}``; ConfigurationError naming a bad entry."""
    if not isinstance(values, Mapping):
        raise ConfigurationError(f"{type(recipe).__qualname__}.metrics must return a mapping, got {values!r:.60}")
    out: dict[str, float] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{type(recipe).__qualname__}.metrics: name {name!r} is not a string")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        # NaN is allowed: it is an honest "undefined" (an AUC over one class only).
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"{type(recipe).__qualname__}.metrics: {name} is {value!r}, not a number")
        out[name] = float(value)
    return dict(sorted(out.items()))


def load_recipe(project: Project, name: str) -> Recipe[Any]:
    """The recipe ``name`` (an ``evp.toml`` name or ``module:attribute``), instantiated and checked."""
    declared = project.load("recipes", name)
    if not isinstance(declared, type) or not issubclass(declared, Recipe):
        raise ConfigurationError(f"recipes.{name} is {declared!r}, not a subclass of trainer.recipe.Recipe")
    declared.check()
    return declared()


def code_digest(*classes: type) -> dict[str, str]:
    """Per module defining one of ``classes``: the sha256 of that module's source file.

    A module is the file Python loaded it from (a package's ``__init__.py``). The digest
    is read from disk now, so an edited file shows even in a process that imported the
    old one.
    """
    digest: dict[str, str] = {}
    for cls in classes:
        current = module_digest(cls.__module__)
        if current is None:
            raise ConfigurationError(f"module {cls.__module__} has no source file to digest")
        digest[cls.__module__] = current
    return dict(sorted(digest.items()))


def module_digest(module_name: str) -> str | None:
    """The current sha256 of ``module_name``'s source file, or None if it has none (or no longer imports)."""
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
    except ImportError:
        return None
    try:
        source = inspect.getsourcefile(module)
    except TypeError:  # a built-in module
        return None
    if source is None or not Path(source).is_file():
        return None
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()
