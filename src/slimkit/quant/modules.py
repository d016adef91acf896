"""Quantized layers: store integer codes + scales, compute from them.

Weight-only layers keep ``codes`` (int8), ``scale`` (fp32, (C, 1) or (1, 1)) and, when
asymmetric, ``zero_point`` (fp32 holding integers). The forward dequantizes the weight to
fp32 and runs the float kernel: the artifact is ~4x smaller, latency is measured, not assumed.
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
from slimkit.quant import primitives as P


class _QuantWeight(CompressedModule):
    """Shared storage of a weight-only quantized layer."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None

    def _init_storage(
        self, shape: tuple[int, ...], bits: int, symmetric: bool, per_channel: bool
    ) -> None:
        self.bits, self.symmetric, self.per_channel = bits, symmetric, per_channel
        rows = shape[0] if per_channel else 1
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(rows, 1))
        self.register_buffer("zero_point", None if symmetric else torch.zeros(rows, 1))

    def _quant_spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "symmetric": self.symmetric, "per_channel": self.per_channel}

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize the float weight ``w`` into this layer's storage."""
        scale, zero = P.qparams(w, self.bits, self.symmetric, self.per_channel)
        self.codes.copy_(P.quantize(w, scale, zero, self.bits, self.symmetric))
        self.scale.copy_(scale)
        if self.zero_point is not None:
            self.zero_point.copy_(zero)

    def dense_weight(self) -> torch.Tensor:
        return P.dequantize(self.codes, self.scale, self.zero_point)

    def n_params(self) -> int:
        return self.codes.numel()

    def describe(self) -> str:
        gran = "per_channel" if self.per_channel else "per_tensor"
        sym = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {gran} {sym} weights, dequantized to fp32 for the float kernel"


@compressed_module
class QuantLinear(_QuantWeight):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), bits, symmetric, per_channel)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, m: nn.Linear, **quant: Any) -> QuantLinear:
        q = cls(m.in_features, m.out_features, m.bias is not None, **quant)
        q.set_weight(m.weight)
        copy_bias(m, q)
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
class QuantConv2d(_QuantWeight, ConvGeometry):
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
    ) -> None:
        super().__init__()
        shape = self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        self._init_storage(shape, bits, symmetric, per_channel)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_float(cls, m: nn.Conv2d, **quant: Any) -> QuantConv2d:
        q = cls(**conv_args(m), bias=m.bias is not None, **quant)
        q.set_weight(m.weight)
        copy_bias(m, q)
        return q

    def spec(self) -> dict[str, Any]:
        return {**self.geometry_spec(), "bias": self.bias is not None, **self._quant_spec()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.dense_weight(), self.bias)


@compressed_module
class QuantEmbedding(_QuantWeight):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self._init_storage((num_embeddings, embedding_dim), bits, symmetric, per_channel)

    @classmethod
    def from_float(cls, m: nn.Embedding, **quant: Any) -> QuantEmbedding:
        if m.max_norm is not None or m.sparse:
            raise ValueError("max_norm/sparse embeddings are not supported")
        q = cls(m.num_embeddings, m.embedding_dim, m.padding_idx, **quant)
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
        rows = F.embedding(idx, self.codes).float()  # (..., D) codes of the looked-up rows
        if self.per_channel:
            scale = F.embedding(idx, self.scale)  # (..., 1)
            zero = None if self.zero_point is None else F.embedding(idx, self.zero_point)
        else:
            scale, zero = self.scale.reshape(()), self.zero_point
            zero = None if zero is None else zero.reshape(())
        return (rows - zero if zero is not None else rows) * scale

    def describe(self) -> str:
        return (
            super()
            .describe()
            .replace("dequantized to fp32 for the float kernel", "rows dequantized on lookup")
        )
