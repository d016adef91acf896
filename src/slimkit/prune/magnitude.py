"""Unstructured magnitude pruning: zero the smallest |w|, store the rest sparsely."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slimkit.config import Scope, StageConfig
from slimkit.errors import ConfigError
from slimkit.pipeline import Context
from slimkit.prune.sparse import SparseConv2d, SparseLinear
from slimkit.registry import register
from slimkit.select import swap_modules


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(StageConfig):
    """Prune ``sparsity`` of the weights of each layer (scope layer) or of all (global)."""

    kind = "prune"
    method = "magnitude"

    sparsity: float = 0.5
    scope: Scope = Scope.LAYER

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.sparsity < 1.0:
            self.fail("sparsity", "a fraction in [0, 1)")


def magnitude_masks(
    weights: list[torch.Tensor], sparsity: float, scope: Scope
) -> list[torch.Tensor]:
    """Keep-masks (True = kept) removing exactly round(sparsity * n) smallest |w| of each
    layer (scope layer) or of all layers together (scope global); ties go by position."""
    scores = [w.detach().abs().reshape(-1).float() for w in weights]
    if scope is Scope.GLOBAL:
        flat = _keep_largest(torch.cat(scores), sparsity)
        keeps = list(torch.split(flat, [s.numel() for s in scores]))
    else:
        keeps = [_keep_largest(s, sparsity) for s in scores]
    return [k.reshape(w.shape) for k, w in zip(keeps, weights, strict=True)]


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask over ``scores`` (1-D) dropping the ``sparsity`` fraction of smallest."""
    k = round(sparsity * scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:k]] = False
    return keep


_SWAPS: dict[type[nn.Module], type[SparseLinear | SparseConv2d]] = {
    nn.Linear: SparseLinear,
    nn.Conv2d: SparseConv2d,
}


@register(MagnitudeConfig, types=tuple(_SWAPS))
def apply_magnitude(model: nn.Module, config: MagnitudeConfig, ctx: Context) -> nn.Module:
    unique = {id(m): m for m in (model.get_submodule(n) for n in ctx.names)}  # shared once
    weights: list[torch.Tensor] = [m.weight for m in unique.values()]  # type: ignore[misc]
    for w, keep in zip(
        weights, magnitude_masks(weights, config.sparsity, config.scope), strict=True
    ):
        w.mul_(keep)

    def make(name: str, module: nn.Module) -> nn.Module:
        try:
            return _SWAPS[type(module)].from_float(module)  # type: ignore[arg-type]
        except ValueError as e:
            raise ConfigError(f"layer {name!r} cannot be pruned by magnitude: {e}") from None

    swap_modules(model, ctx.names, make)
    return model
