"""Weight-quantized layers: Linear, Conv2d and Embedding whose weight is held in the affine
integer format (:mod:`slimkit.formats.affine`: codes, scales, zero points).

Packed codes are unpacked once into an int8 cache (1 byte per weight, refreshed when the
buffer changes). The forward dequantizes the weight to fp32 and runs the float kernel (an
embedding dequantizes only the rows it looks up): no integer kernel is claimed here, the
report's measured latency says what it costs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import ConvGeometry, compressed_module, conv_args, copy_bias
from slimkit.config import Granularity
from slimkit.formats.affine import AffineFormat
from slimkit.formats.base import WeightFormat
from slimkit.layers.weight import FormatWeight


class QuantWeight(FormatWeight):
    """A layer whose weight is held in the affine integer format (:class:`AffineFormat`),
    with the spec keys of its first version (``per_channel`` rather than a granularity)."""

    format: AffineFormat

    @classmethod
    def format_class(cls, spec: dict[str, Any]) -> type[WeightFormat]:
        return AffineFormat

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    in_scale: torch.Tensor | None

    def _init_storage(
        self,
        shape: tuple[int, ...],
        bits: int,
        symmetric: bool,
        per_channel: bool,
        group_size: int | None,
        input_scaling: bool = False,
    ) -> None:
        if group_size is not None:
            granularity = Granularity.PER_GROUP
        else:
            granularity = Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR
        fmt = AffineFormat(tuple(shape), bits, symmetric, granularity, group_size, input_scaling)
        self._init_format(fmt)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def symmetric(self) -> bool:
        return self.format.symmetric

    @property
    def per_channel(self) -> bool:
        return self.format.per_channel

    @property
    def group_size(self) -> int | None:
        return self.format.group_size

    def _quant_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "per_channel": self.per_channel,
            "group_size": self.group_size,
        }
        if self.format.input_scaling:
            spec["input_scaling"] = True
        return spec

    @property
    def codes(self) -> torch.Tensor:
        """The int8 codes, shaped like the weight (unpacked once, cached)."""
        codes: torch.Tensor = self.unpacked()
        return codes

    def set_quantized(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> None:
        """Store given integer ``codes`` (weight shape) with their scale and zero point."""
        self.store(self.format.from_codes(codes, scale, zero))

    def set_in_scale(self, factor: torch.Tensor) -> None:
        if self.in_scale is None:
            raise ValueError("this layer was built without input_scaling")
        self.store({"in_scale": factor})


@compressed_module
class QuantLinear(QuantWeight):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        group_size: int | None = None,
        input_scaling: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, in_features)
        self._init_storage(shape, bits, symmetric, per_channel, group_size, input_scaling)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def empty_like(cls, m: nn.Linear, **quant: Any) -> QuantLinear:
        """A layer of ``m``'s shape and bias, its codes still to be set."""
        q = cls(m.in_features, m.out_features, m.bias is not None, **quant)
        copy_bias(m, q)
        return q

    @classmethod
    def from_float(cls, m: nn.Linear, **quant: Any) -> QuantLinear:
        q = cls.empty_like(m, **quant)
        q.set_weight(m.weight)
        return q

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            **self._quant_spec(),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}"


@compressed_module
class QuantConv2d(QuantWeight, ConvGeometry):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int] | tuple[int, int],
        stride: list[int] | tuple[int, int] = (1, 1),
        padding: list[int] | tuple[int, int] = (0, 0),
        dilation: list[int] | tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        group_size: int | None = None,
        input_scaling: bool = False,
    ) -> None:
        super().__init__()
        shape = self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        self._init_storage(shape, bits, symmetric, per_channel, group_size, input_scaling)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def empty_like(cls, m: nn.Conv2d, **quant: Any) -> QuantConv2d:
        q = cls(**conv_args(m), bias=m.bias is not None, **quant)
        copy_bias(m, q)
        return q

    @classmethod
    def from_float(cls, m: nn.Conv2d, **quant: Any) -> QuantConv2d:
        q = cls.empty_like(m, **quant)
        q.set_weight(m.weight)
        return q

    def spec(self) -> dict[str, Any]:
        return {**self.geometry_spec(), "bias": self.bias is not None, **self._quant_spec()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.dense_weight(), self.bias)


@compressed_module
class QuantEmbedding(QuantWeight):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        shape = (num_embeddings, embedding_dim)
        self._init_storage(shape, bits, symmetric, per_channel, group_size)

    @classmethod
    def empty_like(cls, m: nn.Embedding, **quant: Any) -> QuantEmbedding:
        if m.max_norm is not None or m.sparse:
            raise ValueError("max_norm/sparse embeddings are not supported")
        return cls(m.num_embeddings, m.embedding_dim, m.padding_idx, **quant)

    @classmethod
    def from_float(cls, m: nn.Embedding, **quant: Any) -> QuantEmbedding:
        q = cls.empty_like(m, **quant)
        q.set_weight(m.weight)
        return q

    def spec(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            **self._quant_spec(),
        }

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantize only the looked-up rows."""
        rows = F.embedding(idx, self.codes).float()  # (..., D)
        groups = self.scale.shape[1]
        rows = rows.reshape(*rows.shape[:-1], groups, -1)  # (..., G, D / G)
        if self.zero_point is not None:
            rows = rows - self._row_params(self.zero_point, idx).unsqueeze(-1)
        out = rows * self._row_params(self.scale, idx).unsqueeze(-1)
        return out.reshape(*out.shape[:-2], -1)

    @staticmethod
    def _row_params(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per-row parameters of the looked-up rows: (..., G)."""
        if t.shape[0] == 1:  # per tensor
            return t.reshape(()).expand(*idx.shape, 1)
        return F.embedding(idx, t)

    runs_as = "dequantized row by row on lookup"
