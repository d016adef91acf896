"""N:M semi-structured pruning: in every group of M consecutive weights of an output row,
keep the N of highest score (magnitude ``|w|`` or wanda ``|w| * ||x||``).

Groups run along the input dimension of each row: a Linear's ``in_features``; a Conv2d's
flattened ``C_in / groups * kh * kw`` (``weight.reshape(C_out, -1)``, channel-major). M must
divide that length for every selected layer; the stage refuses, naming the layers, before
any data pass. The result is stored as ``SparseLinear`` / ``SparseConv2d`` with the kept
values, a 1-bit mask, and ``pattern: "N:M"`` in the layer's spec. The mask holds exactly N
of every M even where a kept weight is zero, so the stored pattern is always complete.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.errors import ConfigError
from slimkit.layers.sparse import SPARSE_SWAPS, check_sparse_convertible, to_sparse
from slimkit.prune.importance import Criterion, importance, unique_names, weight_of
from slimkit.registry import register
from slimkit.select import swap_modules

NM_CRITERIA = (Criterion.MAGNITUDE, Criterion.WANDA)


@dataclasses.dataclass(frozen=True)
class NMConfig(StageConfig):
    """Keep ``n`` of every ``m`` consecutive weights along each row's input dimension."""

    kind = "prune"
    method = "nm"

    n: int = 2
    m: int = 4
    criterion: Criterion = Criterion.MAGNITUDE

    def validate(self) -> None:
        super().validate()
        if self.m < 2:
            self.fail("m", "an integer >= 2 (the group length)")
        if not 0 < self.n < self.m:
            self.fail("n", f"an integer with 0 < n < m = {self.m} (weights kept per group)")
        if self.criterion not in NM_CRITERIA:
            self.fail("criterion", ", ".join(c.value for c in NM_CRITERIA))

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        """ConfigError before any work: a layer with no sparse twin, or layers whose input
        size ``m`` does not divide (all of them listed)."""
        check_sparse_convertible(model, names, self.method)
        check_group_length(model, names, self)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool keep-mask of ``scores``' shape (C_out, ...): in each group of ``m`` consecutive
    entries of every flattened row, the ``n`` highest (ties: the earlier entry goes first)."""
    groups = scores.reshape(scores.shape[0], -1, m)  # (C_out, K / m, m)
    order = torch.argsort(groups, dim=-1, stable=True)  # ascending
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.reshape(scores.shape)


def check_group_length(model: nn.Module, names: Sequence[str], config: NMConfig) -> None:
    """ConfigError listing every selected layer whose row length ``m`` does not divide."""
    lengths = {name: int(weight_of(model, name)[0].numel()) for name in names}
    check_m_divides(lengths, config.m, "prune.nm")


def check_m_divides(sizes: dict[str, int], m: int, method: str) -> None:
    """ConfigError listing every layer (name -> input size) whose size ``m`` does not
    divide: N:M groups never straddle two rows."""
    bad = [f"{name} ({k})" for name, k in sizes.items() if k % m]
    if bad:
        raise ConfigError(
            f"{method}: m={m} does not divide the input size of {len(bad)} layer(s): "
            f"{', '.join(bad)}; add them to ignore or choose another m"
        )


@register(NMConfig, types=tuple(SPARSE_SWAPS))
def apply_nm(model: nn.Module, config: NMConfig, ctx: Context) -> nn.Module:
    config.check(model, ctx.names)
    names = unique_names(model, ctx.names)
    scores = importance(config.criterion)(model, names, ctx)
    keeps = {
        id(model.get_submodule(name)): nm_keep(scores[name], config.n, config.m) for name in names
    }

    def make(_name: str, module: nn.Module) -> nn.Module:
        return to_sparse(module, keeps[id(module)], config.pattern)

    swap_modules(model, ctx.names, make)
    return model
