"""Tiny search spaces, a toy task and a counting trainer for the nas tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import slimkit.nas.stage  # noqa: F401  (registers the nas stage)
from slimkit.data import Batch
from slimkit.nas import search as search_mod
from slimkit.tasks.searched import SearchSpace
from tests.toy_tasks import LabelledToyTask

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


class ToyTask(LabelledToyTask):
    name = "toy-nas"
    description = "toy MLP task with a search space"

    def __init__(self) -> None:
        self.x, self.y = toy_data()

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3)).eval()

    def calibration_data(self) -> list[Batch]:
        return [self.x[:32]]

    def example_inputs(self) -> Batch:
        return self.x[:1]

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
