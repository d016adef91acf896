"""Unstructured pruning by an importance criterion: zero the lowest-scoring weights, store
the rest sparsely (``SparseLinear`` / ``SparseConv2d``).

Criteria (``prune/importance.py``): ``magnitude`` (``|w|``, no data), ``wanda`` (``|w| *
||x||``, calibration data), ``taylor`` (``|w * dL/dw|``, the task's labelled training data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from slimkit.config import Scope, StageConfig
from slimkit.context import Context
from slimkit.layers.sparse import (
    SPARSE_SWAPS,
    SparseKernel,
    check_sparse_convertible,
    to_sparse,
)
from slimkit.prune.importance import (
    Criterion,
    Importance,
    Unit,
    importance,
    keep_masks,
    unique_names,
    zero_pruned,
)
from slimkit.registry import register
from slimkit.select import swap_modules

#: criteria that score single weights
WEIGHT_CRITERIA = (Criterion.MAGNITUDE, Criterion.WANDA, Criterion.TAYLOR)


@dataclasses.dataclass(frozen=True)
class UnstructuredOptions(StageConfig):
    """What every unstructured method takes: prune ``sparsity`` of the weights of each layer
    (scope layer) or of all selected layers (global); every layer keeps at least
    ``min_density`` of its weights, rounded up (so one weight at least while it is > 0).
    ``kernel`` runs the pruned Linear layers: ``auto`` (measured per batch size on the
    machine that runs them), ``dense`` or ``csr`` (``SparseLinear``; convolutions run dense)."""

    sparsity: float = 0.5
    scope: Scope = Scope.LAYER
    min_density: float = 0.01
    kernel: SparseKernel = SparseKernel.AUTO

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.sparsity < 1.0:
            self.fail("sparsity", "a fraction in [0, 1)")
        if not 0.0 <= self.min_density <= 1.0:
            self.fail("min_density", "a fraction in [0, 1] (0 lets a layer be pruned away)")

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        """ConfigError before any work naming a selected layer with no sparse twin."""
        check_sparse_convertible(model, names, self.method)


@dataclasses.dataclass(frozen=True)
class UnstructuredConfig(UnstructuredOptions):
    """Unstructured pruning scored by ``criterion``: magnitude, wanda or taylor."""

    kind = "prune"
    method = "unstructured"

    criterion: Criterion = Criterion.MAGNITUDE

    def validate(self) -> None:
        super().validate()
        if self.criterion not in WEIGHT_CRITERIA:
            self.fail("criterion", ", ".join(c.value for c in WEIGHT_CRITERIA))


def prune_unstructured(
    model: nn.Module, config: UnstructuredOptions, criterion: Importance, ctx: Context
) -> nn.Module:
    """Zero the weights of the selected layers that ``criterion`` scores lowest and swap in
    sparse layers; every check and every data pass comes before the model changes."""
    if criterion.unit is not Unit.WEIGHT:
        name = type(criterion).__name__
        raise ValueError(f"unstructured pruning needs a per-weight criterion, not {name}")
    config.check(model, ctx.names)
    names = unique_names(model, ctx.names)
    scores = criterion(model, names, ctx)
    keeps = keep_masks(
        [scores[n] for n in names],
        config.sparsity,
        config.scope,
        config.min_density,
        criterion.normalize,
    )
    zero_pruned(model, names, keeps)
    kernel = config.kernel.value
    swap_modules(model, ctx.names, lambda _name, m: to_sparse(m, kernel=kernel))
    return model


@register(UnstructuredConfig, types=tuple(SPARSE_SWAPS))
def apply_unstructured(model: nn.Module, config: UnstructuredConfig, ctx: Context) -> nn.Module:
    return prune_unstructured(model, config, importance(config.criterion), ctx)
