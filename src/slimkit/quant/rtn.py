"""Round-to-nearest weight-only quantization of Linear, Conv2d and Embedding layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from slimkit.context import Context
from slimkit.errors import ConfigError
from slimkit.formats.base import WeightFormat, format_class, format_kinds
from slimkit.layers.weight import format_layer, weight_shape
from slimkit.quant.common import WEIGHT_SWAPS, WeightQuantConfig, empty_twin
from slimkit.registry import register
from slimkit.select import swap_modules


@dataclasses.dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    """Weight-only quantization: codes + scales stored, dequantized for the float kernel.
    ``format`` names the weight format (``affine`` integer codes by default; any registered
    format made from the same bits / granularity / group size, such as ``nf4``)."""

    method = "rtn"

    format: str = "affine"

    def validate(self) -> None:
        super().validate()
        if format_class(self.format) is None:
            self.fail("format", f"one of {', '.join(format_kinds())}")

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        super().check(model, names)
        for name in dict.fromkeys(names):
            try:
                self.weight_format(model.get_submodule(name))
            except ValueError as e:
                raise ConfigError(f"{self._where('format')}: layer {name!r}: {e}") from None

    def weight_format(self, module: nn.Module) -> WeightFormat:
        """The format of ``module``'s weight under these options (ValueError when it cannot
        hold them)."""
        cls = format_class(self.format)
        assert cls is not None
        return cls.from_scheme(weight_shape(module), self.scheme())


@register(RTNConfig, types=tuple(WEIGHT_SWAPS))
def apply_rtn(model: nn.Module, config: RTNConfig, ctx: Context) -> nn.Module:
    config.check(model, ctx.names)
    quant = config.quant_kwargs()

    def make(name: str, module: nn.Module) -> nn.Module:
        if config.format != "affine":
            return format_layer(module, config.weight_format(module))
        q = empty_twin(module, **quant)
        q.set_weight(module.weight)  # type: ignore[arg-type]
        return q

    swap_modules(model, ctx.names, make)
    return model
