"""A regression recipe for the tests: linear regression on scikit-learn's bundled diabetes data.

Nothing in evp is specific to classification: the loss and the metrics are the recipe's.
The target is standardised inside the model (buffers from the training split), so the
model predicts in the target's own units.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from torch import nn

from trainer.config import TrainConfig
from trainer.data import Column, Table
from trainer.recipe import Recipe

COLUMNS = (Column("features", "float32", (10,)), Column("target", "float32"))


@cache
def diabetes() -> Table:
    data = load_diabetes()
    ids = tuple(f"patient-{row:03d}" for row in range(len(data.target)))
    return Table(COLUMNS, ids, {"features": data.data.astype(np.float32), "target": data.target.astype(np.float32)})


@dataclass(frozen=True)
class LinearConfig(TrainConfig):
    epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 0.05


class ToTargetUnits(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", targets.mean())
        self.register_buffer("std", targets.std())

    def forward(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.squeeze(1) * self.std + self.mean


class Linear(Recipe[LinearConfig]):
    config = LinearConfig
    inputs = "features"
    target = "target"

    def model(self, config: LinearConfig, train: Table) -> nn.Module:
        self.scale = ToTargetUnits(torch.tensor(train[self.target]))
        return nn.Sequential(nn.Linear(train.column(self.inputs).shape[0], 1), self.scale)

    def optimizer(self, config: LinearConfig, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # In standardised units, so the learning rate does not depend on the target's scale.
        return F.mse_loss((outputs - self.scale.mean) / self.scale.std, (targets - self.scale.mean) / self.scale.std)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        residual = ((outputs - targets) ** 2).sum()
        total = ((targets - targets.mean()) ** 2).sum()
        return {"rmse": F.mse_loss(outputs, targets).sqrt().item(), "r2": (1 - residual / total).item()}
