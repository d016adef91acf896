"""Gradual unstructured pruning: reach the final sparsity in steps, fine-tuning in between.

The ``gradual`` method prunes the selected layers in ``steps`` rounds. Round ``t`` of ``T``
scores the still-dense weights (pruned ones are zero) with the criterion (magnitude, wanda or
taylor, ``prune/importance.py``) and prunes them to the schedule's sparsity ``s_t``:

- ``iterative``: equal-ratio steps, ``s_t = 1 - (1 - s)^(t / T)`` (each round removes the same
  fraction of the weights still there);
- ``agp``: the polynomial schedule of Zhu & Gupta (2017), ``s_t = s (1 - (1 - t / T)^3)``
  (large steps first, small ones at the end);

with ``s_T = s`` exactly. A weight pruned in one round stays pruned: the masks are nested.
After each round the model is fine-tuned (``train/finetune.py``) for ``finetune_epochs`` on
the task's labelled data with the masks held fixed (pruned weights stay exactly zero). At the
end the layers become ``SparseLinear`` / ``SparseConv2d`` holding the weights of the last masks.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

import torch
from torch import nn

from slimkit.calib.capture import labelled_batches
from slimkit.config import Scope
from slimkit.context import Context
from slimkit.layers.sparse import SPARSE_SWAPS, to_sparse
from slimkit.prune.importance import (
    Importance,
    importance,
    keep_masks,
    unique_names,
    weight_of,
    zero_pruned,
)
from slimkit.prune.unstructured import UnstructuredConfig
from slimkit.registry import register
from slimkit.select import swap_modules
from slimkit.train.finetune import finetune


class Schedule(str, enum.Enum):
    ITERATIVE, AGP = "iterative", "agp"


# -- pure math ---------------------------------------------------------------------------
def sparsity_schedule(sparsity: float, steps: int, schedule: Schedule | str) -> list[float]:
    """The sparsity after each of ``steps`` rounds, ending exactly at ``sparsity``; each
    value in (0, sparsity] when ``sparsity`` > 0, non-decreasing."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: got {sparsity!r}; allowed: a fraction in [0, 1)")
    if steps < 1:
        raise ValueError(f"steps: got {steps!r}; allowed: an integer >= 1")
    kind = Schedule(schedule)
    out = []
    for t in range(1, steps):
        f = t / steps
        if kind is Schedule.ITERATIVE:  # 1 - (1 - s)^f, accurate for small s
            out.append(0.0 - math.expm1(f * math.log1p(-sparsity)))
        else:
            out.append(sparsity * (1.0 - (1.0 - f) ** 3))
    return [*out, sparsity]


def nested_keep_masks(
    scores: Sequence[torch.Tensor],
    previous: Sequence[torch.Tensor],
    sparsity: float,
    scope: Scope,
    min_density: float,
    normalize: bool,
) -> list[torch.Tensor]:
    """``keep_masks`` of ``scores`` at ``sparsity`` where the weights ``previous`` (keep-masks
    of the same shapes) already pruned rank below every other, so each new mask keeps a subset
    of its previous one while the previous masks keep at least ``sparsity``'s count. In global
    scope with ``normalize`` each layer's scores are divided by their mean (over all its
    weights, as ``keep_masks`` does) before the pruned ones are ranked last."""
    ranked = []
    for s, keep in zip(scores, previous, strict=True):
        s = s.detach().double()
        if normalize and scope is Scope.GLOBAL and float(s.mean()) > 0:
            s = s / s.mean()
        ranked.append(torch.where(keep, s, -math.inf))
    return keep_masks(ranked, sparsity, scope, min_density, normalize=False)


# -- config and handler --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GradualConfig(UnstructuredConfig):
    """Unstructured pruning to ``sparsity`` in ``steps`` rounds on the ``schedule`` (iterative
    or agp), scored by ``criterion``, fine-tuning ``finetune_epochs`` after each round (Adam at
    ``lr``, shuffled by ``seed``; 0 epochs: no fine-tuning, no labelled data needed)."""

    kind = "prune"
    method = "gradual"

    steps: int = 4
    schedule: Schedule = Schedule.AGP
    finetune_epochs: int = 1
    lr: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.steps < 1:
            self.fail("steps", "an integer >= 1")
        if self.finetune_epochs < 0:
            self.fail("finetune_epochs", "an integer >= 0 (0 = no fine-tuning between steps)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            self.fail("lr", "a positive finite number")
        if self.seed < 0:
            self.fail("seed", "an integer >= 0")


def prune_step(
    model: nn.Module,
    names: Sequence[str],
    criterion: Importance,
    ctx: Context,
    sparsity: float,
    config: GradualConfig,
    previous: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Score the named layers, zero their weights outside the new nested keep-masks (nested
    in ``previous``) and return the masks."""
    scores = criterion(model, names, ctx)
    keeps = nested_keep_masks(
        [scores[n] for n in names],
        previous,
        sparsity,
        config.scope,
        config.min_density,
        criterion.normalize,
    )
    zero_pruned(model, names, keeps)
    return keeps


@register(GradualConfig, types=tuple(SPARSE_SWAPS))
def apply_gradual(model: nn.Module, config: GradualConfig, ctx: Context) -> nn.Module:
    config.check(model, ctx.names)
    criterion = importance(config.criterion)
    epochs = config.finetune_epochs
    batches = labelled_batches(model, ctx, "gradual pruning fine-tuning") if epochs else []
    names = unique_names(model, ctx.names)
    keeps = [torch.ones_like(weight_of(model, n), dtype=torch.bool) for n in names]
    plan = sparsity_schedule(config.sparsity, config.steps, config.schedule)
    for t, sparsity in enumerate(plan, 1):
        keeps = prune_step(model, names, criterion, ctx, sparsity, config, keeps)
        ctx.report(f"gradual: step {t}/{len(plan)}, sparsity {sparsity:.4f}")
        if batches:
            masks = [(weight_of(model, n), k) for n, k in zip(names, keeps, strict=True)]
            finetune(model, batches, epochs, config.lr, config.seed, masks, ctx.report)
    by_module = {id(model.get_submodule(n)): k for n, k in zip(names, keeps, strict=True)}
    kernel = config.kernel.value
    swap_modules(model, ctx.names, lambda _name, m: to_sparse(m, by_module[id(m)], kernel=kernel))
    return model.eval()
