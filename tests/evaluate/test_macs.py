from __future__ import annotations

import torch
from torch import nn

from slimkit.evaluate.macs import count_macs


def test_linear_macs_are_exact() -> None:
    assert count_macs(nn.Linear(64, 10), torch.randn(1, 64)) == 640
    assert count_macs(nn.Linear(64, 10), torch.randn(3, 64)) == 3 * 640


def test_conv_macs_follow_the_formula() -> None:
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 9, 9)
    out_h = out_w = (9 + 2 * 1 - 3) // 2 + 1
    expected = 2 * 8 * out_h * out_w * (4 // 2) * 3 * 3
    assert count_macs(conv, x) == expected


def test_sequential_sums_layers_and_accepts_tuple_and_dict_inputs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    model = Two()
    x, y = torch.randn(1, 8), torch.randn(1, 6)
    assert count_macs(model, (x, y)) == 8 * 4 + 6 * 4
    assert count_macs(model, {"x": x, "y": y}) == 8 * 4 + 6 * 4
