"""What the weight-quantization methods share: their options and the layer checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from slimkit.config import Granularity, StageConfig
from slimkit.formats.base import Scheme
from slimkit.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear, QuantWeight
from slimkit.layers.shapes import check_twins

MIN_BITS, MAX_BITS = 2, 8

#: float layer type -> its weight-quantized twin
WEIGHT_SWAPS: dict[type[nn.Module], type[QuantLinear | QuantConv2d | QuantEmbedding]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
}


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig(StageConfig):
    """Bits and granularity of integer weight codes."""

    kind = "quantize"

    bits: int = 8
    granularity: Granularity = Granularity.PER_CHANNEL
    group_size: int | None = None
    symmetric: bool = True

    def validate(self) -> None:
        super().validate()
        if not MIN_BITS <= self.bits <= MAX_BITS:
            self.fail("bits", f"{MIN_BITS}..{MAX_BITS}")
        grouped = self.granularity is Granularity.PER_GROUP
        if grouped and (self.group_size is None or self.group_size < 1):
            self.fail("group_size", "a positive integer when granularity is per_group")
        if not grouped and self.group_size is not None:
            self.fail("group_size", "null unless granularity is per_group")

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        """ConfigError before any work: a selected layer with no quantized twin of its form.
        A ``group_size`` that does not divide a layer's input size is fine: the last group
        of each row is shorter (``primitives.n_groups``)."""
        check_convertible(model, names, self.method)

    def scheme(self) -> Scheme:
        """The options as the one value formats take."""
        return Scheme(self.bits, self.granularity, self.group_size, self.symmetric)

    def quant_kwargs(self, bits: int | None = None) -> dict[str, Any]:
        """Keyword arguments of the quantized modules for these options."""
        return {
            "bits": self.bits if bits is None else bits,
            "symmetric": self.symmetric,
            "per_channel": self.granularity is not Granularity.PER_TENSOR,
            "group_size": self.group_size,
        }


def check_convertible(model: nn.Module, names: Iterable[str], method: str) -> None:
    """ConfigError naming the first selected layer that has no quantized twin of its form."""
    check_twins(model, names, WEIGHT_SWAPS, method, "quantized")


def empty_twin(module: nn.Module, **quant: Any) -> QuantWeight:
    """A quantized layer of ``module``'s shape, codes still to be set."""
    twin: Any = WEIGHT_SWAPS[type(module)]
    return twin.empty_like(module, **quant)  # type: ignore[no-any-return]
