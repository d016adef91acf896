"""Sparse layers: the nonzero weights + a packed bitmask, so size on disk falls with density.

They execute with the dense float kernel (the dense weight is rebuilt once, after loading,
and kept): at the sparsities of unstructured pruning the dense kernel is faster on CPU, and
the report's measured latency says so.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import (
    CompressedModule,
    ConvGeometry,
    compressed_module,
    conv_args,
    copy_bias,
)
from slimkit.prune.bitmask import pack_mask, unpack_mask


class _SparseWeight(CompressedModule):
    values: torch.Tensor
    mask: torch.Tensor
    dense: torch.Tensor | None

    def _init_storage(self, shape: tuple[int, ...], nnz: int) -> None:
        self.weight_shape = tuple(shape)
        numel = int(torch.Size(shape).numel())
        self.register_buffer("values", torch.zeros(nnz))
        self.register_buffer("mask", torch.zeros((numel + 7) // 8, dtype=torch.uint8))
        self.register_buffer("dense", None, persistent=False)

    def set_weight(self, w: torch.Tensor) -> None:
        """Store the nonzeros of ``w`` (the layer must have been built with their count)."""
        keep = w.detach().reshape(-1) != 0
        self.values = w.detach().reshape(-1)[keep].float().clone()
        self.mask = pack_mask(keep)
        self.dense = None

    def dense_weight(self) -> torch.Tensor:
        if self.dense is None:
            numel = int(torch.Size(self.weight_shape).numel())
            w = torch.zeros(numel, dtype=self.values.dtype)
            w[unpack_mask(self.mask, numel)] = self.values
            self.dense = w.reshape(self.weight_shape)
        return self.dense

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.dense = None

    def n_params(self) -> int:
        return self.values.numel()

    def density(self) -> float:
        return self.values.numel() / max(1, int(torch.Size(self.weight_shape).numel()))

    def describe(self) -> str:
        return "sparse weights (values + bitmask) on disk, run with the dense kernel"


@compressed_module
class SparseLinear(_SparseWeight):
    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), nnz)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, m: nn.Linear) -> SparseLinear:
        nnz = int((m.weight != 0).sum())
        s = cls(m.in_features, m.out_features, nnz, m.bias is not None)
        s.set_weight(m.weight)
        copy_bias(m, s)
        return s

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "nnz": self.values.numel(),
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)


@compressed_module
class SparseConv2d(_SparseWeight, ConvGeometry):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int] | tuple[int, int],
        nnz: int,
        stride: list[int] | tuple[int, int] = (1, 1),
        padding: list[int] | tuple[int, int] = (0, 0),
        dilation: list[int] | tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        shape = self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        self._init_storage(shape, nnz)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_float(cls, m: nn.Conv2d) -> SparseConv2d:
        s = cls(nnz=int((m.weight != 0).sum()), bias=m.bias is not None, **conv_args(m))
        s.set_weight(m.weight)
        copy_bias(m, s)
        return s

    def spec(self) -> dict[str, Any]:
        return {**self.geometry_spec(), "nnz": self.values.numel(), "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.dense_weight(), self.bias)
