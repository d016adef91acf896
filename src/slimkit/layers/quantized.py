"""Weight-quantized layers: store integer codes + scales, compute from them.

Storage (the buffers an artifact holds):

- ``qweight``: the codes. 8-bit codes are an int8 tensor of the weight's shape; 2..7-bit codes
  are offset to unsigned and bit-packed into a flat uint8 tensor of ``ceil(n * bits / 8)``
  bytes, so the artifact's size shows the bits.
- ``scale`` (fp32, (R, G)): one per tensor (1, 1), output channel (C, 1) or group of
  ``group_size`` consecutive inputs (C, K / group_size); ``zero_point`` (same shape, integers
  held in fp32) when asymmetric.
- ``in_scale`` (fp32, (K_in,)), only with ``input_scaling=True``: a per-input-channel factor
  folded back into the weight (activation-aware scaling quantizes ``W * s`` and stores
  ``1 / s`` here).

Packed codes are unpacked once into an int8 cache (1 byte per weight, refreshed when the
buffer changes). The forward dequantizes the weight to fp32 and runs the float kernel: no
integer kernel is claimed here, the report's measured latency says what it costs.
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
from slimkit.layers import packing
from slimkit.layers import primitives as P


def scale_shape(shape: tuple[int, ...], per_channel: bool, group_size: int | None) -> tuple:
    """(R, G) of the scales of a weight of ``shape`` (first dim = output channels)."""
    k = 1
    for d in shape[1:]:
        k *= d
    if group_size is not None:
        P.check_group_size(k, group_size)
        return (shape[0], k // group_size)
    return (shape[0], 1) if per_channel else (1, 1)


class QuantWeight(CompressedModule):
    """Shared storage of a layer whose weight is held as integer codes."""

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
        P.qrange(bits, symmetric)  # validates bits
        self.bits, self.symmetric = bits, symmetric
        self.per_channel, self.group_size = per_channel, group_size
        self.weight_shape = tuple(shape)
        rows = scale_shape(self.weight_shape, per_channel, group_size)
        n = int(torch.Size(shape).numel())
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(shape, dtype=torch.int8))
        else:
            size = packing.packed_bytes(n, bits)
            self.register_buffer("qweight", torch.zeros(size, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows))
        self.register_buffer("zero_point", None if symmetric else torch.zeros(rows))
        in_features = shape[1] if len(shape) > 1 else 1
        self.register_buffer("in_scale", torch.ones(in_features) if input_scaling else None)
        self._cache: tuple[int, torch.Tensor] | None = None

    def _quant_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "per_channel": self.per_channel,
            "group_size": self.group_size,
        }
        if self.in_scale is not None:
            spec["input_scaling"] = True
        return spec

    # -- codes ---------------------------------------------------------------------------
    @property
    def codes(self) -> torch.Tensor:
        """The int8 codes, shaped like the weight (unpacked once, cached)."""
        if self.bits == 8:
            return self.qweight
        version = self.qweight._version
        if self._cache is None or self._cache[0] != version:
            n = int(torch.Size(self.weight_shape).numel())
            u = packing.unpack(self.qweight, self.bits, n)
            codes = packing.from_unsigned(u, self.bits, self.symmetric)
            self._cache = (version, codes.reshape(self.weight_shape))
        return self._cache[1]

    def set_quantized(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> None:
        """Store given integer ``codes`` (weight shape) with their scale and zero point."""
        if tuple(codes.shape) != self.weight_shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)}, expected {self.weight_shape}")
        codes = codes.to(torch.int8)
        if self.bits == 8:
            self.qweight.copy_(codes)
        else:
            u = packing.to_unsigned(codes.reshape(-1), self.bits, self.symmetric)
            self.qweight.copy_(packing.pack(u, self.bits))
        self.scale.copy_(scale.reshape(self.scale.shape))
        if self.zero_point is not None:
            if zero is None:
                raise ValueError("an asymmetric layer needs zero points")
            self.zero_point.copy_(zero.reshape(self.zero_point.shape))
        self._cache = None

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize the float weight ``w`` (round to nearest) into this layer's storage."""
        w = w.detach().float()
        group = self.group_size
        scale, zero = P.qparams(w, self.bits, self.symmetric, self.per_channel, group)
        self.set_quantized(P.quantize(w, scale, zero, self.bits, self.symmetric), scale, zero)

    def set_in_scale(self, factor: torch.Tensor) -> None:
        if self.in_scale is None:
            raise ValueError("this layer was built without input_scaling")
        self.in_scale.copy_(factor)

    def dense_weight(self) -> torch.Tensor:
        w = P.dequantize(self.codes, self.scale, self.zero_point)
        if self.in_scale is not None:
            view = [1] * w.dim()
            view[1] = -1
            w = w * self.in_scale.reshape(view)
        return w

    def n_params(self) -> int:
        return int(torch.Size(self.weight_shape).numel())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def describe(self) -> str:
        if self.group_size is not None:
            gran = f"group {self.group_size}"
        else:
            gran = "per_channel" if self.per_channel else "per_tensor"
        sym = "sym" if self.symmetric else "asym"
        packed = "" if self.bits == 8 else " packed"
        scaled = " input-scaled" if self.in_scale is not None else ""
        return (
            f"int{self.bits}{packed} {gran} {sym}{scaled} weights, "
            "dequantized on the fly for the fp32 kernel"
        )


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

    def describe(self) -> str:
        return super().describe().replace("on the fly for the fp32 kernel", "row by row on lookup")
