"""A tiny model whose layers' input sizes are not multiples of the usual group sizes: a
Linear(72, 16) (groups of 32: 32, 32 and 8) and a Conv2d of 5 * 3 * 3 = 45 inputs (32 and
13), for the ragged-group tests of quantization, artifacts and export."""

from __future__ import annotations

import torch
from torch import nn


class RaggedToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(5, 8, 3, padding=1)
        self.fc = nn.Linear(72, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3))  # (B, 8)
        return self.fc(torch.cat([h] * 9, dim=1))  # (B, 16)


def ragged_toy(cls: type[RaggedToy] = RaggedToy) -> RaggedToy:
    """A seeded ``cls`` in eval mode."""
    torch.manual_seed(0)
    return cls().eval()
