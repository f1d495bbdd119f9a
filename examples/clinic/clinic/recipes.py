"""The clinic recipe: logistic regression over 30 standardised measurements.

The measurements have very different scales (areas in the hundreds, smoothness around
0.1), so the model standardises them itself, with the mean and standard deviation of the
*training* split. They are buffers: part of the weights, hashed with them, saved with them,
and applied unchanged at inference, so a caller feeds the raw values a snapshot holds.
Optionally a hidden layer (``hidden > 0``) makes it a small MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from events.errors import ConfigurationError
from trainer.config import TrainConfig
from trainer.data import Table
from trainer.recipe import Recipe


@dataclass(frozen=True)
class LogisticConfig(TrainConfig):
    epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 0.05
    weight_decay: float = 0.001
    hidden: int = 0  #: 0: plain logistic regression; otherwise one hidden layer of this width

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.learning_rate <= 0:
            raise ConfigurationError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ConfigurationError(f"weight_decay must not be negative, got {self.weight_decay}")
        if self.hidden < 0:
            raise ConfigurationError(f"hidden must not be negative, got {self.hidden}")


class Standardize(nn.Module):
    """(x - mean) / std with statistics of the training rows, kept as buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", rows.mean(dim=0))
        # A constant column would divide by zero; it carries no information, so scale it by 1.
        std = rows.std(dim=0)
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class Logistic(Recipe[LogisticConfig]):
    config = LogisticConfig
    inputs = "features"
    target = "label"

    def model(self, config: LogisticConfig, train: Table) -> nn.Module:
        rows = torch.tensor(train[self.inputs], dtype=torch.float32)
        width = rows.shape[1]
        if config.hidden:
            head: list[nn.Module] = [nn.Linear(width, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1)]
        else:
            head = [nn.Linear(width, 1)]
        return nn.Sequential(Standardize(rows), *head, nn.Flatten(0))

    def optimizer(self, config: LogisticConfig, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9,
                               weight_decay=config.weight_decay)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        predicted = (outputs > 0).long()
        true_positive = ((predicted == 1) & (targets == 1)).sum().item()
        precision = true_positive / max(int((predicted == 1).sum().item()), 1)
        recall = true_positive / max(int((targets == 1).sum().item()), 1)
        return {
            "accuracy": (predicted == targets).double().mean().item(),
            "f1": 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall),
            "auc": roc_auc(outputs.double().cpu(), targets.cpu()),
        }


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties count half)."""
    positives, negatives = scores[targets == 1], scores[targets == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    above = (positives[:, None] > negatives[None, :]).double().sum()
    ties = (positives[:, None] == negatives[None, :]).double().sum()
    return float((above + 0.5 * ties) / (len(positives) * len(negatives)))
