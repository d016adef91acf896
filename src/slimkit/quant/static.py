"""Static activation quantization (w8a8-static): integer weights and integer activations.

``StaticQuantLinear`` / ``StaticQuantConv2d`` are ``QuantLinear`` / ``QuantConv2d`` with the
input side of :mod:`slimkit.layers.activations`: one fixed (static) activation range per layer
input, found once on calibration data by a range observer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from slimkit.calib.capture import run_batches, watching
from slimkit.compressed import compressed_modules
from slimkit.context import Context
from slimkit.errors import DataError
from slimkit.layers.activations import (
    StaticActivations,
)
from slimkit.layers.quantized import QuantConv2d, QuantLinear
from slimkit.quant.common import MAX_BITS, MIN_BITS, WeightQuantConfig
from slimkit.quant.observers import OBSERVERS, Observer, make_observer
from slimkit.registry import register
from slimkit.select import swap_modules


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
