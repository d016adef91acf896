"""The input side of a compressed layer: activation quantization.

``StaticActivations`` adds one fixed (static) activation range per layer input to any
compressed layer (:mod:`slimkit.layers.shapes`), found once on calibration data:

- ``act_scale`` (fp32, (1,)) and ``act_zero`` (fp32, (1,), an integer): the input ``x`` is
  rounded to codes ``q_x = clamp(round(x / act_scale) + act_zero, qmin, qmax)`` of
  ``act_bits`` bits.

The forward computes from the codes: ``(q_x - act_zero) * act_scale`` (an integer times one
scale) against the layer's decoded weight through the float kernel, which for integer weights
``(q_w - z_w) * s_w`` is the integer product ``sum (q_x - z_x) (q_w - z_w)`` times
``s_x * s_w`` up to fp32 rounding. The activations are really rounded; the kernel is the fp32
one, so this is no faster.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.formats import primitives as P


# -- activation math (pure functions) ------------------------------------------------------
def quantize_activation(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Integer codes of ``x`` with one scale and zero point, as an fp32 tensor of x's shape:
    ``clamp(round(x / scale) + zero, qmin, qmax)``."""
    qmin, qmax = P.qrange(bits, symmetric)
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax)


def dequantize_activation(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """``(codes - zero) * scale``: integer differences times one scale."""
    return (codes - zero) * scale


# -- the input side ------------------------------------------------------------------------
class StaticActivations(nn.Module):
    """A static per-tensor activation range (``act_*`` buffers) in front of a layer: put it
    first among a compressed layer's bases (``class StaticQuantLinear(StaticActivations,
    QuantLinear)``); its ``act_bits`` and ``act_symmetric`` join the layer's spec."""

    bits: int  # the weight's, from the layer

    simulated: ClassVar[bool] = False
    has_streams: ClassVar[bool] = False  # not Huffman-coded: its activation range rides along
    act_scale: torch.Tensor
    act_zero: torch.Tensor

    def __init__(self, act_bits: int = 8, act_symmetric: bool = False, **shape: Any) -> None:
        super().__init__(**shape)
        P.qrange(act_bits, act_symmetric)  # validates act_bits
        self.act_bits, self.act_symmetric = act_bits, act_symmetric
        self.register_buffer("act_scale", torch.ones(1))
        self.register_buffer("act_zero", torch.zeros(1))

    def set_activation_params(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store the activation scale (> 0) and integer zero point (one value each)."""
        scale = scale.detach().float().reshape(1)
        zero = zero.detach().float().reshape(1)
        qmin, qmax = P.qrange(self.act_bits, self.act_symmetric)
        if not (bool(torch.isfinite(scale).all()) and float(scale) > 0):
            raise ValueError(f"activation scale must be finite and positive, got {float(scale)}")
        if float(zero) != round(float(zero)) or not qmin <= float(zero) <= qmax:
            raise ValueError(
                f"activation zero point {float(zero)} is not a code in [{qmin}, {qmax}]"
            )
        if self.act_symmetric and float(zero) != 0.0:
            raise ValueError("symmetric activations need a zero point of 0")
        self.act_scale.copy_(scale)
        self.act_zero.copy_(zero)

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of the input ``x`` (fp32, x's shape)."""
        return quantize_activation(
            x, self.act_scale, self.act_zero, self.act_bits, self.act_symmetric
        )

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(q_x - z_x) * s_x``: the input as the kernel sees it."""
        return dequantize_activation(self.input_codes(x), self.act_scale, self.act_zero)

    def spec(self) -> dict[str, Any]:
        layer: dict[str, Any] = super().spec()  # type: ignore[misc]
        return {**layer, "act_bits": self.act_bits, "act_symmetric": self.act_symmetric}

    def describe(self) -> str:
        packed = "" if self.bits == 8 else " packed"
        if self.bits == self.act_bits:
            what = f"int{self.bits}{packed} weights and activations"
        else:
            what = f"int{self.bits}{packed} weights and int{self.act_bits} activations"
        return f"{what} (static ranges), integer arithmetic on the fp32 kernel (no faster)"
