"""Round-to-nearest weight-only quantization of Linear, Conv2d and Embedding layers."""

from __future__ import annotations

import dataclasses

from torch import nn

from slimkit.config import Granularity, StageConfig
from slimkit.errors import ConfigError
from slimkit.pipeline import Context
from slimkit.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.registry import register
from slimkit.select import swap_modules

SUPPORTED_BITS = (8,)


@dataclasses.dataclass(frozen=True)
class RTNConfig(StageConfig):
    """Weight-only quantization: codes + scales stored, dequantized for the float kernel."""

    kind = "quantize"
    method = "rtn"

    bits: int = 8
    granularity: Granularity = Granularity.PER_CHANNEL
    symmetric: bool = True

    def validate(self) -> None:
        super().validate()
        if self.bits not in SUPPORTED_BITS:
            self.fail("bits", ", ".join(map(str, SUPPORTED_BITS)))
        if self.granularity is Granularity.PER_GROUP:
            self.fail("granularity", "per_tensor, per_channel")


_SWAPS: dict[type[nn.Module], type[QuantLinear | QuantConv2d | QuantEmbedding]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
}


@register(RTNConfig, types=tuple(_SWAPS))
def apply_rtn(model: nn.Module, config: RTNConfig, ctx: Context) -> nn.Module:
    quant = {
        "bits": config.bits,
        "symmetric": config.symmetric,
        "per_channel": config.granularity is Granularity.PER_CHANNEL,
    }

    def make(name: str, module: nn.Module) -> nn.Module:
        try:
            return _SWAPS[type(module)].from_float(module, **quant)  # type: ignore[arg-type]
        except ValueError as e:
            raise ConfigError(f"layer {name!r} cannot be quantized by rtn: {e}") from None

    swap_modules(model, ctx.names, make)
    return model
