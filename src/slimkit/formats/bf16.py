"""bfloat16 weights: each weight rounded to bf16 (8 exponent bits like fp32, 7 mantissa bits),
half the bytes of fp32 and the same range.

Stored tensor: ``weight`` (bf16, the weight's shape). Where the CPU computes in bf16 natively
(AVX512-BF16 or AMX, :func:`slimkit.cpu.has_bf16`) the layer runs its kernel in bf16 on the
stored tensor (inputs cast to bf16, outputs back to fp32); elsewhere it decodes to fp32 and
runs the fp32 kernel. This is the honest floor every integer format must beat on speed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from slimkit.cpu import has_bf16
from slimkit.formats.base import Scheme, Slot, Tensors, WeightFormat


@dataclasses.dataclass(frozen=True)
class BFloat16Format(WeightFormat, kind="bf16"):
    """The weight in bfloat16 (see the module docstring)."""

    @classmethod
    def from_scheme(cls, shape: tuple[int, ...], scheme: Scheme) -> BFloat16Format:
        return cls(tuple(shape))

    def layout(self) -> dict[str, Slot | None]:
        return {"weight": Slot(self.shape, torch.bfloat16)}

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": w.detach().to(torch.bfloat16).clone()}

    def decode(self, t: Tensors, unpacked: Any = None) -> torch.Tensor:
        return t["weight"].float()

    def native(self, t: Tensors) -> torch.Tensor | None:
        """The stored bf16 weight where the CPU computes in bf16, else None."""
        return t["weight"] if has_bf16() else None

    def describe(self) -> str:
        return "bf16 weights" + (", bf16 kernel" if has_bf16() else "")
