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

from slimkit.compressed import compressed_modules
from slimkit.config import Granularity
from slimkit.formats.affine import AffineFormat
from slimkit.formats.base import WeightFormat
from slimkit.layers.shapes import Conv2dOp, EmbeddingOp, LinearOp
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
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        group_size: int | None = None,
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

    def storage_spec(self) -> dict[str, Any]:
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


class QuantLinear(LinearOp, QuantWeight):
    """A Linear with affine integer weights."""


class QuantConv2d(Conv2dOp, QuantWeight):
    """A Conv2d with affine integer weights."""


class QuantEmbedding(EmbeddingOp, QuantWeight):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantize only the looked-up rows."""
        rows = F.embedding(idx, self.codes).float()  # (..., D)
        if self.group_size is not None:  # groups of D, the last one shorter when ragged
            d, size = rows.shape[-1], self.group_size
            if self.zero_point is not None:
                zero = F.embedding(idx, self.zero_point)  # (..., G)
                rows = rows - zero.repeat_interleave(size, dim=-1)[..., :d]
            scale = F.embedding(idx, self.scale)  # (..., G)
            return rows * scale.repeat_interleave(size, dim=-1)[..., :d]
        rows = rows.reshape(*rows.shape[:-1], 1, -1)  # (..., 1, D): one pair per row / tensor
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


compressed_modules(QuantLinear, QuantConv2d, QuantEmbedding)
