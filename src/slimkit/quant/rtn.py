"""Round-to-nearest weight-only quantization of Linear, Conv2d and Embedding layers."""

from __future__ import annotations

import dataclasses

from torch import nn

from slimkit.context import Context
from slimkit.quant.common import WEIGHT_SWAPS, WeightQuantConfig, empty_twin
from slimkit.registry import register
from slimkit.select import swap_modules


@dataclasses.dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    """Weight-only quantization: codes + scales stored, dequantized for the float kernel."""

    kind = "quantize"
    method = "rtn"


@register(RTNConfig, types=tuple(WEIGHT_SWAPS))
def apply_rtn(model: nn.Module, config: RTNConfig, ctx: Context) -> nn.Module:
    config.check(model, ctx.names)
    quant = config.quant_kwargs()

    def make(name: str, module: nn.Module) -> nn.Module:
        q = empty_twin(module, **quant)
        q.set_weight(module.weight)  # type: ignore[arg-type]
        return q

    swap_modules(model, ctx.names, make)
    return model
