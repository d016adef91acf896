"""NF4: QLoRA's 4-bit NormalFloat weights (Dettmers et al., 2023).

Each group of weights (a row, or ``group_size`` consecutive inputs of a row, the last group
shorter when ``group_size`` does not divide the row, or the whole tensor) is divided by its
largest magnitude, then rounded to the nearest of 16 fixed levels in [-1, 1]: the quantiles
of a standard normal distribution, so that normally distributed weights fill every level
about equally, with an exact zero. Stored tensors:

- ``indices`` (uint8): one 4-bit level index per weight, packed two to a byte;
- ``scale`` (fp32, (R, G), ``G = ceil(K / group_size)`` per group): each group's largest
  magnitude (1 for an all-zero group), a short last group's from its own weights only.

The levels are computed from their definition (``nf4_levels``), not stored.
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
from slimkit.formats.affine import scale_shape
from slimkit.formats.base import Scheme, Slot, Stream, Tensors, WeightFormat

BITS = 4
#: QLoRA's choice: the outermost quantile level sits at this probability
OFFSET = 0.9677083


def nf4_levels() -> torch.Tensor:
    """The 16 ascending NF4 levels (float32): 8 positive and 7 negative normal quantiles
    between 0.5 and ``OFFSET`` and an exact 0, scaled so the largest magnitude is 1."""
    # the probabilities in float32 and the quantiles in float64, as QLoRA computed them
    positive = torch.special.ndtri(torch.linspace(OFFSET, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(OFFSET, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (levels / levels.abs().max()).float()


LEVELS = nf4_levels()
#: midpoints between neighbouring levels: a normalized weight's level is its bucket
_CUTS = (LEVELS[1:] + LEVELS[:-1]) / 2


@dataclasses.dataclass(frozen=True)
class NF4Format(WeightFormat, kind="nf4", packed=("indices",), stream_count=1):
    """4-bit NormalFloat levels with one absmax scale per group (see the module docstring)."""

    granularity: Granularity = Granularity.PER_GROUP
    group_size: int | None = 64

    def __post_init__(self) -> None:
        self._granularity()
        grouped = self.granularity is Granularity.PER_GROUP
        if grouped != (self.group_size is not None):
            raise ValueError("group_size is given exactly when granularity is per_group")
        self._rows()  # validates the groups

    @classmethod
    def from_scheme(cls, shape: tuple[int, ...], scheme: Scheme) -> NF4Format:
        if scheme.bits != BITS:
            raise ValueError(f"nf4 stores {BITS}-bit codes; got bits {scheme.bits}")
        if not scheme.symmetric:
            raise ValueError("nf4 levels are symmetric around 0; set symmetric: true")
        return cls(tuple(shape), scheme.granularity, scheme.group_size)

    @classmethod
    def from_options(cls, shape: tuple[int, ...], **options: Any) -> NF4Format:
        options["granularity"] = Granularity(options.get("granularity", "per_group"))
        return cls(tuple(shape), **options)

    def options(self) -> dict[str, Any]:
        return {"granularity": self.granularity.value, "group_size": self.group_size}

    def _rows(self) -> tuple[int, int]:
        per_channel = self.granularity is not Granularity.PER_TENSOR
        return scale_shape(self.shape, per_channel, self.group_size)  # type: ignore[no-any-return]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    # -- storage -------------------------------------------------------------------------
    def layout(self) -> dict[str, Slot | None]:
        return {
            "indices": Slot((packing.packed_bytes(self.numel, BITS),), torch.uint8),
            "scale": Slot(self._rows(), fill=1.0),
        }

    def _per_weight(self, scale: torch.Tensor) -> torch.Tensor:
        """The (R, G) ``scale`` repeated for each weight of its group: (R, numel / R)."""
        r, k = scale.shape[0], self.numel // scale.shape[0]
        if self.group_size is None:  # one scale per row (or for the tensor)
            return scale.expand(r, k)
        return P.per_column(scale, k, self.group_size)

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = self._rows()
        per_channel = self.granularity is not Granularity.PER_TENSOR
        # a ragged last group is padded with its own last value: its absmax is its own
        groups = P.group_view(w.detach().float(), per_channel, self.group_size)  # (R, G, g)
        absmax = groups.abs().amax(dim=2)  # (R, G)
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        values = w.detach().float().reshape(rows[0], -1)  # (R, K): the real weights only
        normalized = (values / self._per_weight(scale)).clamp(-1.0, 1.0)  # (R, K)
        indices = torch.bucketize(normalized.reshape(-1), _CUTS)  # (n,) in 0..15
        return {"indices": packing.pack(indices.to(torch.uint8), BITS), "scale": scale}

    def unpack(self, t: Tensors) -> torch.Tensor:
        """The level index of every weight, int64 (n,)."""
        return packing.unpack(t["indices"], BITS, self.numel).long()

    def decode(self, t: Tensors, unpacked: Any = None) -> torch.Tensor:
        idx = self.unpack(t) if unpacked is None else unpacked
        scale = t["scale"]  # (R, G)
        values = LEVELS.gather(0, idx).reshape(scale.shape[0], -1)  # (R, K)
        return (values * self._per_weight(scale)).reshape(self.shape)

    def stream_kinds(self) -> list[StreamKind]:
        return [StreamKind("indices", BITS)]

    def streams(self, t: Tensors) -> list[Stream]:
        return [self.stream_kinds()[0].of(self.unpack(t).to(torch.uint8))]

    def from_streams(self, t: Tensors, symbols: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"indices": packing.pack(symbols[0], BITS)}

    def verify(self, t: Tensors) -> None:
        scale = t["scale"]
        if not bool((scale > 0).all()):
            raise ValueError("nf4 scales must be positive")

    def describe(self) -> str:
        grouped = self.group_size is not None
        gran = f"group {self.group_size}" if grouped else self.granularity.value
        return f"nf4 (4-bit normal-float levels) {gran} absmax-scaled weights, packed"
