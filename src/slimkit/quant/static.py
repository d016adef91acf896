"""Static activation quantization (w8a8-static): integer weights and integer activations.

``StaticQuantLinear`` / ``StaticQuantConv2d`` keep the integer weight storage of
``QuantLinear`` / ``QuantConv2d`` and add one fixed (static) activation range per layer input,
found once on calibration data by a range observer:

- ``act_scale`` (fp32, (1,)) and ``act_zero`` (fp32, (1,), an integer): the input ``x`` is
  rounded to codes ``q_x = clamp(round(x / act_scale) + act_zero, qmin, qmax)`` of
  ``act_bits`` bits.

The forward computes from the codes: ``(q_x - act_zero) * act_scale`` (an integer times one
scale) against the dequantized weight ``(q_w - z_w) * s_w`` through the float kernel, which is
the integer product ``sum (q_x - z_x) (q_w - z_w)`` times ``s_x * s_w`` up to fp32 rounding.
The activations are really rounded; the kernel is the fp32 one, so this is no faster.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.calib.capture import run_batches, watching
from slimkit.compressed import compressed_modules
from slimkit.context import Context
from slimkit.errors import DataError
from slimkit.formats import primitives as P
from slimkit.layers.quantized import QuantConv2d, QuantLinear, QuantWeight
from slimkit.quant.common import MAX_BITS, MIN_BITS, WeightQuantConfig
from slimkit.quant.observers import OBSERVERS, Observer, make_observer
from slimkit.registry import register
from slimkit.select import swap_modules


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


def observer_options(name: str, bits: int, symmetric: bool, percentile: float) -> dict[str, Any]:
    """Constructor arguments of the observer ``name`` for activations of ``bits`` bits."""
    if name == "percentile":
        return {"percentile": percentile, "symmetric": symmetric}
    if name == "mse":
        return {"bits": bits, "symmetric": symmetric}
    if name == "kl":
        return {"bits": bits, "symmetric": symmetric}
    return {}


# -- layers --------------------------------------------------------------------------------
class StaticActivations(QuantWeight):
    """Integer weight storage plus a static per-tensor activation range (``act_*`` buffers)."""

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
        return {**super().spec(), "act_bits": self.act_bits, "act_symmetric": self.act_symmetric}

    def describe(self) -> str:
        packed = "" if self.bits == 8 else " packed"
        if self.bits == self.act_bits:
            what = f"int{self.bits}{packed} weights and activations"
        else:
            what = f"int{self.bits}{packed} weights and int{self.act_bits} activations"
        return f"{what} (static ranges), integer arithmetic on the fp32 kernel (no faster)"


class StaticQuantLinear(StaticActivations, QuantLinear):
    """A Linear with integer weights and statically quantized integer inputs."""


class StaticQuantConv2d(StaticActivations, QuantConv2d):
    """A Conv2d with integer weights and statically quantized integer inputs."""


compressed_modules(StaticQuantLinear, StaticQuantConv2d)


#: float layer type -> its statically quantized twin
STATIC_SWAPS: dict[type[nn.Module], type[StaticQuantLinear] | type[StaticQuantConv2d]] = {
    nn.Linear: StaticQuantLinear,
    nn.Conv2d: StaticQuantConv2d,
}


def static_twin(module: nn.Module, **quant: Any) -> StaticQuantLinear | StaticQuantConv2d:
    """A statically quantized layer of ``module``'s shape and bias, its codes still to be set."""
    twin: Any = STATIC_SWAPS[type(module)]
    return twin.empty_like(module, **quant)  # type: ignore[no-any-return]


# -- method --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StaticQuantConfig(WeightQuantConfig):
    """Integer weights and integer activations with ranges fixed on calibration data."""

    method = "w8a8-static"

    act_bits: int = 8
    act_symmetric: bool = False
    observer: str = "minmax"
    percentile: float = 99.99

    def validate(self) -> None:
        super().validate()
        if not MIN_BITS <= self.act_bits <= MAX_BITS:
            self.fail("act_bits", f"{MIN_BITS}..{MAX_BITS}")
        if self.observer not in OBSERVERS:
            self.fail("observer", ", ".join(OBSERVERS))
        if not 0.0 < self.percentile <= 100.0:
            self.fail("percentile", "a number in (0, 100]")

    def make_observer(self) -> Observer:
        opts = observer_options(self.observer, self.act_bits, self.act_symmetric, self.percentile)
        return make_observer(self.observer, **opts)


def calibrate_ranges(
    model: nn.Module, names: list[str], data: list[Any], config: StaticQuantConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ``data``: the activation (scale, zero) of each named layer's input."""
    observers = {name: config.make_observer() for name in names}

    def watch(name: str, x: torch.Tensor) -> None:
        observers[name].update(x)

    with watching(model, names, watch):
        run_batches(model, data)
    params = {}
    for name, obs in observers.items():
        try:
            params[name] = obs.qparams(config.act_bits, config.act_symmetric)
        except ValueError:  # the observer saw nothing
            raise DataError(f"layer {name!r} saw no calibration input") from None
    return params


@register(StaticQuantConfig, types=tuple(STATIC_SWAPS))
def apply_static(model: nn.Module, config: StaticQuantConfig, ctx: Context) -> nn.Module:
    data = ctx.need_data("w8a8-static")
    config.check(model, ctx.names)
    params = calibrate_ranges(model, ctx.names, data, config)
    ctx.report(f"w8a8-static: {config.observer} ranges of {len(params)} layer inputs")
    quant = {
        **config.quant_kwargs(),
        "act_bits": config.act_bits,
        "act_symmetric": config.act_symmetric,
    }

    def make(name: str, module: nn.Module) -> nn.Module:
        q = static_twin(module, **quant)
        q.set_weight(module.weight)  # type: ignore[arg-type]
        q.set_activation_params(*params[name])
        return q

    swap_modules(model, ctx.names, make)
    return model
