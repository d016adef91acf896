"""bf16 weights (``quantize.bf16``): every selected Linear, Conv2d and Embedding stores its
weight in bfloat16 (:mod:`slimkit.formats.bf16`) and computes in bf16 where the CPU has bf16
instructions. Half the bytes of fp32; the floor any integer recipe must beat on speed."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.formats.bf16 import BFloat16Format
from slimkit.layers.shapes import check_twins
from slimkit.layers.weight import FORMAT_LAYERS, format_layer, weight_shape
from slimkit.registry import register
from slimkit.select import swap_modules


@dataclasses.dataclass(frozen=True)
class BF16Config(StageConfig):
    """Weights stored in bfloat16, computed in bf16 where the CPU has it."""

    kind = "quantize"
    method = "bf16"

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        check_twins(model, names, FORMAT_LAYERS, self.method, "stored in bf16")


@register(BF16Config, types=tuple(FORMAT_LAYERS))
def apply_bf16(model: nn.Module, config: BF16Config, ctx: Context) -> nn.Module:
    config.check(model, ctx.names)

    def make(name: str, module: nn.Module) -> nn.Module:
        return format_layer(module, BFloat16Format(weight_shape(module)))

    swap_modules(model, ctx.names, make)
    return model
