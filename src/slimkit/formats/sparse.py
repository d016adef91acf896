"""The sparse weight format: the kept weights and a packed keep-mask.

Stored tensors: ``values`` (fp32, ``nnz``, the kept weights in mask order) and ``mask``
(uint8, one bit per weight, :mod:`slimkit.formats.bitmask`), so the size on disk falls with
the density. An optional N:M ``pattern`` ("2:4": in every group of M consecutive weights of
an output row, the row flattened as C_in / groups * kh * kw for a convolution, exactly N are
kept) is checked whenever a mask is stored or loaded. Per group the bitmask takes M bits
where in-group indices would take ``N * ceil(log2(M))``: the same for 2:4, less for 4:8,
more for sparser patterns such as 1:4. The mask is the format's one integer stream.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from slimkit.compressed import Stream, StreamKind
from slimkit.formats.base import Slot, Tensors, WeightFormat
from slimkit.formats.bitmask import check_mask, pack_mask, unpack_mask


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``(n, m)`` of an ``"N:M"`` pattern with ``0 < N < M``; ValueError otherwise."""
    n_text, sep, m_text = pattern.partition(":")
    if sep and n_text.isdigit() and m_text.isdigit() and 0 < int(n_text) < int(m_text):
        return int(n_text), int(m_text)
    raise ValueError(f"pattern {pattern!r} is not 'N:M' with 0 < N < M")


def check_pattern(keep: torch.Tensor, pattern: str) -> None:
    """ValueError unless ``keep`` (C_out, ...) keeps exactly N of each M consecutive
    positions of every flattened output row."""
    n, m = parse_pattern(pattern)
    rows = keep.reshape(keep.shape[0], -1)  # (C_out, K)
    if rows.shape[1] % m or not bool((rows.reshape(len(rows), -1, m).sum(-1) == n).all()):
        raise ValueError(f"the mask does not follow the {pattern} pattern")


@dataclasses.dataclass(frozen=True)
class SparseFormat(WeightFormat, kind="sparse", packed=("mask",), stream_count=1):
    """``nnz`` kept weights and their bitmask (see the module docstring)."""

    nnz: int = 0
    pattern: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.nnz <= self.numel:
            raise ValueError(f"nnz={self.nnz} is not within the weight's {self.numel}")
        if self.pattern is not None:
            parse_pattern(self.pattern)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def layout(self) -> dict[str, Slot | None]:
        return {
            "values": Slot((self.nnz,)),
            "mask": Slot(((self.numel + 7) // 8,), torch.uint8),
        }

    def encode(self, w: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, Any]:
        """The weights of ``w`` that ``keep`` marks (its nonzeros when None); their count
        must be ``nnz`` and ``keep`` must follow the pattern when there is one."""
        if keep is None:
            keep = w.detach() != 0
        if self.pattern is not None:
            check_pattern(keep.reshape(self.shape), self.pattern)
        flat = keep.reshape(-1).bool()
        if int(flat.sum()) != self.nnz:
            raise ValueError(f"{int(flat.sum())} weights kept, the format holds {self.nnz}")
        values = w.detach().reshape(-1)[flat].float().clone()
        return {"values": values, "mask": pack_mask(flat)}

    def unpack(self, t: Tensors) -> torch.Tensor:
        """The keep-mask, one bool per weight (numel,)."""
        return unpack_mask(t["mask"], self.numel)

    def decode(self, t: Tensors, unpacked: Any = None) -> torch.Tensor:
        """Zeros with the kept values in their places (differentiable in the values)."""
        keep = self.unpack(t) if unpacked is None else unpacked
        values = t["values"]
        return values.new_zeros(self.numel).masked_scatter(keep, values).reshape(self.shape)

    def stream_kinds(self) -> list[StreamKind]:
        """The packed keep-mask, one symbol per mask byte."""
        return [StreamKind("mask", 8, bitmask=True, n_weights=self.numel)]

    def streams(self, t: Tensors) -> list[Stream]:
        return [self.stream_kinds()[0].of(t["mask"].clone())]

    def from_streams(self, t: Tensors, symbols: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"mask": symbols[0]}

    def verify(self, t: Tensors) -> None:
        check_mask(t["mask"], self.numel, t["values"].numel())
        if t["values"].numel() != self.nnz:
            raise ValueError(f"{t['values'].numel()} values stored, the format holds {self.nnz}")
        if self.pattern is not None:
            check_pattern(self.unpack(t).reshape(self.shape), self.pattern)

    def n_values(self) -> int:
        return self.nnz

    def options(self) -> dict[str, Any]:
        """``nnz``, and ``pattern`` for an N:M weight (older specs have none)."""
        return {"nnz": self.nnz} if self.pattern is None else super().options()

    def describe(self) -> str:
        kind = f"{self.pattern} semi-structured sparse" if self.pattern else "sparse"
        return f"{kind} weights (values + bitmask) on disk"
