"""Tiny search spaces, a toy task and a counting trainer for the nas tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import slimkit.nas.stage  # noqa: F401  (registers the nas stage)
from slimkit.data import Batch
from slimkit.nas import search as search_mod
from slimkit.tasks.base import Task
from slimkit.tasks.searched import SearchSpace

CNN_SPACE = SearchSpace(
    "cnn", (1, 8, 8), 10, hidden=(8, 16), fc_depth=(1, 2), channels=(2, 4),
    kernels=(3, 5), separable=(False, True), conv_depth=(1, 3),
)  # fmt: skip
MLP_SPACE = SearchSpace("mlp", (16,), 3, hidden=(4, 8, 16), fc_depth=(1, 3))


def toy_data(n: int = 96, features: int = 16, classes: int = 3) -> tuple[torch.Tensor, ...]:
    """Separable toy classification: labels are the argmax of a fixed linear map."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    return x, (x @ w).argmax(dim=1)


class ToyTask(Task):
    name = "toy-nas"
    description = "toy MLP task with a search space"
    primary_metric = "accuracy"
    modality = "image"
    default_batch = 8

    def __init__(self) -> None:
        self.x, self.y = toy_data()

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3)).eval()

    def calibration_data(self) -> list[Batch]:
        return [self.x[:32]]

    def train_data(self) -> list[tuple[Batch, torch.Tensor]]:
        return [(self.x[i : i + 32], self.y[i : i + 32]) for i in range(0, len(self.x), 32)]

    def example_inputs(self) -> Batch:
        return self.x[:1]

    def latency_inputs(self, batch: int | None = None) -> Batch:
        return self.x[: batch or self.default_batch]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            return {"accuracy": float((model(self.x).argmax(1) == self.y).float().mean())}

    def robustness(self, model: nn.Module) -> dict[str, float]:
        return {}

    def search_space(self) -> SearchSpace:
        return MLP_SPACE


@pytest.fixture
def toy_task() -> ToyTask:
    return ToyTask()


@pytest.fixture
def counting_trainer(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the trainer by a fast fake (accuracy from the genome's size); record calls."""
    calls: list[dict[str, Any]] = []

    def fake(genome: dict[str, Any], seed: int, settings: Any, data: Any) -> float:
        calls.append(genome)
        size = sum(genome["hidden"]) + sum(c for c, _, _ in genome.get("convs", []))
        return round(1.0 - 1.0 / (1 + size) + (seed % 7) * 1e-4, 6)

    monkeypatch.setattr(search_mod, "train_trial", fake)
    return calls
