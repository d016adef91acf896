"""A small ResNet-style CNN on scikit-learn's digits upsampled to 32x32, for structured pruning.

The network holds the couplings a structured pruner has to follow: residual adds (an identity
and a strided 1x1-projection shortcut), a channel concatenation of two branches, a depthwise
plus pointwise pair and a grouped convolution, each convolution followed by BatchNorm.
Data, training and weight caching are those of ``DigitsTask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.constructible import register_constructible
from slimkit.tasks.digits import DigitsTask

SIZE = 32  # the 8x8 digits are upsampled to SIZE x SIZE


class ConvBN(nn.Sequential):
    """A bias-free convolution followed by BatchNorm ("same" padding for odd kernels)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        super().__init__(conv, nn.BatchNorm2d(cout))


class Residual(nn.Module):
    """Two 3x3 ConvBNs plus a shortcut: identity, or a 1x1 ConvBN projection when the
    shape changes. ``groups`` applies to the second convolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride)
        self.conv2 = ConvBN(cout, cout, 3, groups=groups)
        reshape = stride != 1 or cin != cout
        self.shortcut = ConvBN(cin, cout, 1, stride) if reshape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W)
        y = self.conv2(F.relu(self.conv1(x)))  # (B, cout, H/stride, W/stride)
        return F.relu(y + self.shortcut(x))


class Separable(nn.Module):
    """A depthwise 3x3 ConvBN (groups == channels) then a pointwise 1x1 ConvBN."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = ConvBN(cin, cin, 3, stride, groups=cin)
        self.pointwise = ConvBN(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W)
        x = F.relu(self.depthwise(x))  # (B, cin, H/stride, W/stride)
        return F.relu(self.pointwise(x))  # (B, cout, H/stride, W/stride)


class Concat(nn.Module):
    """A 1x1 and a 3x3 ConvBN branch on the same input, concatenated along channels."""

    def __init__(self, cin: int, half: int) -> None:
        super().__init__()
        self.branch1 = ConvBN(cin, half, 1)
        self.branch3 = ConvBN(cin, half, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W)
        a = F.relu(self.branch1(x))  # (B, half, H, W)
        b = F.relu(self.branch3(x))  # (B, half, H, W)
        return torch.cat([a, b], dim=1)  # (B, 2 * half, H, W)


@register_constructible
class MiniResNet(nn.Module):
    """A ResNet-style CNN for (B, 1, 32, 32) digit images, about 80k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(1, 24, 3, stride=2)
        self.block1 = Residual(24, 24)  # identity shortcut
        self.block2 = Residual(24, 48, stride=2, groups=4)  # 1x1 projection shortcut
        self.block3 = Separable(48, 96, stride=2)
        self.block4 = Concat(96, 48)
        self.fc = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 32, 32)
        x = F.relu(self.stem(x))  # (B, 24, 16, 16)
        x = self.block1(x)  # (B, 24, 16, 16)
        x = self.block2(x)  # (B, 48, 8, 8)
        x = self.block3(x)  # (B, 96, 4, 4)
        x = self.block4(x)  # (B, 96, 4, 4)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 96)
        return self.fc(x)  # (B, 10)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) -> (B, 1, SIZE, SIZE) by bilinear interpolation (fixed, deterministic)."""
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


class DigitsResNet(DigitsTask):
    name = "digits-resnet"
    description = (
        "Small ResNet (residual, concat, depthwise, grouped convs) on sklearn digits at 32x32 "
        "(trained on first use); top-1"
    )
    arch = MiniResNet
    epochs = 8
    lr = 1e-2

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return upsample(x)  # (B, 1, 32, 32)

    def latency_description(self, batch: int | None = None) -> str:
        return f"batch {batch or self.default_batch} x 1x{SIZE}x{SIZE} images"
