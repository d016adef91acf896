"""Affine integer weights: codes of 2..8 bits with a scale (and a zero point) per tensor,
output channel or group of inputs.

Stored tensors:

- ``qweight``: the codes. 8-bit codes are an int8 tensor of the weight's shape; 2..7-bit codes
  are offset to unsigned and bit-packed into a flat uint8 tensor of ``ceil(n * bits / 8)``
  bytes (:mod:`slimkit.formats.packing`), so the artifact's size shows the bits.
- ``scale`` (fp32, (R, G)): one per tensor (1, 1), output channel (C, 1) or group of
  ``group_size`` consecutive inputs (C, ceil(K / group_size)), the last group of a row
  shorter when ``group_size`` does not divide K; ``zero_point`` (same shape, integers held
  in fp32) when asymmetric.
- ``in_scale`` (fp32, (K_in,)), only with ``input_scaling``: a per-input-channel factor
  folded back into the weight (activation-aware scaling quantizes ``W * s`` and stores
  ``1 / s`` here).

The math is in :mod:`slimkit.formats.primitives`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from slimkit.compressed import StreamKind
from slimkit.config import Granularity
from slimkit.formats import packing
from slimkit.formats import primitives as P
from slimkit.formats.base import Scheme, Slot, Stream, Tensors, WeightFormat


def scale_shape(shape: tuple[int, ...], per_channel: bool, group_size: int | None) -> tuple:
    """(R, G) of the scales of a weight of ``shape`` (first dim = output channels); per
    group ``G = ceil(K / group_size)``."""
    k = math.prod(shape[1:])
    if group_size is not None:
        return (shape[0], P.n_groups(k, group_size))
    return (shape[0], 1) if per_channel else (1, 1)


@dataclasses.dataclass(frozen=True)
class AffineFormat(WeightFormat, kind="affine", packed=("qweight",), stream_count=1):
    """Integer codes of ``bits`` bits with scales (see the module docstring)."""

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = Granularity.PER_CHANNEL
    group_size: int | None = None
    input_scaling: bool = False

    def __post_init__(self) -> None:
        self._granularity()
        P.qrange(self.bits, self.symmetric)  # validates bits
        grouped = self.granularity is Granularity.PER_GROUP
        if grouped != (self.group_size is not None):
            raise ValueError("group_size is given exactly when granularity is per_group")
        scale_shape(self.shape, self.per_channel, self.group_size)  # validates the groups

    @classmethod
    def from_scheme(cls, shape: tuple[int, ...], scheme: Scheme) -> AffineFormat:
        return cls(shape, scheme.bits, scheme.symmetric, scheme.granularity, scheme.group_size)

    @classmethod
    def from_options(cls, shape: tuple[int, ...], **options: Any) -> AffineFormat:
        options["granularity"] = Granularity(options.get("granularity", "per_channel"))
        return cls(tuple(shape), **options)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "granularity": self.granularity.value}

    @property
    def per_channel(self) -> bool:
        return self.granularity is not Granularity.PER_TENSOR

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    # -- storage -------------------------------------------------------------------------
    def layout(self) -> dict[str, Slot | None]:
        rows = scale_shape(self.shape, self.per_channel, self.group_size)
        if self.bits == 8:
            codes = Slot(self.shape, torch.int8)
        else:
            codes = Slot((packing.packed_bytes(self.numel, self.bits),), torch.uint8)
        in_features = self.shape[1] if len(self.shape) > 1 else 1
        return {
            "qweight": codes,
            "scale": Slot(rows, fill=1.0),
            "zero_point": None if self.symmetric else Slot(rows),
            "in_scale": Slot((in_features,), fill=1.0) if self.input_scaling else None,
        }

    def from_codes(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The stored tensors for given integer ``codes`` (weight shape), scale and zero."""
        if tuple(codes.shape) != self.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)}, expected {self.shape}")
        codes = codes.to(torch.int8)
        rows = scale_shape(self.shape, self.per_channel, self.group_size)
        out = {"qweight": codes if self.bits == 8 else self._pack(codes)}
        out["scale"] = scale.reshape(rows)
        if not self.symmetric:
            if zero is None:
                raise ValueError("an asymmetric layer needs zero points")
            out["zero_point"] = zero.reshape(rows)
        if self.input_scaling:  # stores the codes' own weight; a caller may set it after
            out["in_scale"] = torch.ones(self.shape[1] if len(self.shape) > 1 else 1)
        return out

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Round to nearest, with parameters from the min/max of each row or group."""
        w = w.detach().float()
        scale, zero = P.qparams(w, self.bits, self.symmetric, self.per_channel, self.group_size)
        codes = P.quantize(w, scale, zero, self.bits, self.symmetric, self.group_size)
        return self.from_codes(codes, scale, zero)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        u = packing.to_unsigned(codes.reshape(-1), self.bits, self.symmetric)
        return packing.pack(u, self.bits)

    def unpack(self, t: Tensors) -> torch.Tensor:
        """The int8 codes, shaped like the weight."""
        if self.bits == 8:
            return t["qweight"]
        u = packing.unpack(t["qweight"], self.bits, self.numel)
        return packing.from_unsigned(u, self.bits, self.symmetric).reshape(self.shape)

    def decode(self, t: Tensors, unpacked: Any = None) -> torch.Tensor:
        codes = self.unpack(t) if unpacked is None else unpacked
        w = P.dequantize(codes, t["scale"], t.get("zero_point"), self.group_size)
        in_scale = t.get("in_scale")
        if in_scale is not None:
            view = [1] * w.dim()
            view[1] = -1
            w = w * in_scale.reshape(view)
        return w

    def stream_kinds(self) -> list[StreamKind]:
        return [StreamKind("qweight", self.bits)]

    def streams(self, t: Tensors) -> list[Stream]:
        if self.bits == 8:  # int8 codes, reinterpreted byte for byte
            symbols = t["qweight"].reshape(-1).view(torch.uint8).clone()
        else:
            symbols = packing.unpack(t["qweight"], self.bits, self.numel).to(torch.uint8)
        return [self.stream_kinds()[0].of(symbols)]

    def from_streams(self, t: Tensors, symbols: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.bits == 8:
            return {"qweight": symbols[0].view(torch.int8).reshape(self.shape)}
        return {"qweight": packing.pack(symbols[0], self.bits)}

    def describe(self) -> str:
        grouped = self.group_size is not None
        gran = f"group {self.group_size}" if grouped else self.granularity.value
        sym = "sym" if self.symmetric else "asym"
        packed = "" if self.bits == 8 else " packed"
        scaled = " input-scaled" if self.input_scaling else ""
        return f"int{self.bits}{packed} {gran} {sym}{scaled} weights"
