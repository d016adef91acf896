"""A toy image task whose every layer's input size is a multiple of 64 (the shipped recipes'
group size), for exporting every recipe that applies to a CNN."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.data import Batch
from tests.toy_tasks import LabelledToyTask


class ToyCNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, width, 4, stride=2, padding=1)  # inputs 4 * 4 * 4 = 64
        self.conv2 = nn.Conv2d(width, 16, 2, stride=2)  # inputs 16 * 2 * 2 = 64
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class ToyImageTask(LabelledToyTask):
    name = "toy-deploy"
    description = "toy 4x8x8 image classifier"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(96, 4, 8, 8, generator=g)
        self.y = self.x.mean(dim=(2, 3)).argmax(dim=1)  # 4 classes of the 10 outputs

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return ToyCNN().eval()

    def student(
        self, width: float = 1.0, depth: float = 1.0, init: str = "teacher", seed: int = 0
    ) -> nn.Module:
        torch.manual_seed(seed)
        return ToyCNN(max(1, round(16 * width))).eval()

    def calibration_data(self) -> list[Batch]:
        return [self.x[i : i + 32] for i in range(0, 96, 32)]

    def example_inputs(self) -> Batch:
        return self.x[:2]
