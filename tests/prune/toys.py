"""Tiny models and a labelled toy task shared by the pruning tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.data import Batch
from slimkit.tasks.base import Task


class Net(nn.Module):
    """(B, 8, 5, 5) -> (B, 4) logits; every layer's input size is a multiple of 8 (and 4):
    conv 8 * 3 * 3 = 72, fc1 8, fc2 16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8, 5, 5)
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))  # (B, 8)
        return self.fc2(torch.relu(self.fc1(h)))  # (B, 4)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def inputs(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 8, 5, 5, generator=torch.Generator().manual_seed(seed))


class ToyTask(Task):
    """Random images for ``Net`` labelled by another random ``Net``."""

    name = "toy"
    description = "random images labelled by a random Net"
    primary_metric = "accuracy"
    modality = "image"
    default_batch = 8

    def __init__(self, labelled: bool = True) -> None:
        x = inputs(48, seed=3)  # (48, 8, 5, 5)
        with torch.no_grad():
            y = net(seed=5)(x).argmax(dim=1)  # (48,)
        self.batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
        self.labelled = labelled

    def model(self) -> nn.Module:
        return net()

    def calibration_data(self) -> list[Batch]:
        return [x for x, _ in self.batches]

    def train_data(self) -> list[tuple[Batch, torch.Tensor]] | None:
        return list(self.batches) if self.labelled else None

    def example_inputs(self) -> Batch:
        return self.batches[0][0][:1]

    def latency_inputs(self, batch: int | None = None) -> Batch:
        return self.batches[0][0]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = self.batches[0]
        return {"accuracy": float((model(x).argmax(dim=1) == y).float().mean())}

    def robustness(self, model: nn.Module) -> dict[str, float]:
        return {}


def prune_recipe(method: str, **options: Any) -> dict[str, Any]:
    return {"name": "p", "stages": [{"prune": {"method": method, **options}}]}
