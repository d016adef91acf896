"""Unstructured magnitude pruning: zero the smallest |w|, store the rest sparsely.

The ``magnitude`` method is ``unstructured`` with the magnitude criterion (``|w|`` compared
as is across layers in global scope); both run ``prune_unstructured``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slimkit.config import Scope
from slimkit.context import Context
from slimkit.layers.sparse import SPARSE_SWAPS
from slimkit.prune.importance import Magnitude, keep_masks, magnitude_scores
from slimkit.prune.unstructured import UnstructuredOptions, prune_unstructured
from slimkit.registry import register


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(UnstructuredOptions):
    """Prune ``sparsity`` of the weights of each layer (scope layer) or of all (global) by
    ``|w|``; every layer keeps at least ``min_density`` of its weights."""

    kind = "prune"
    method = "magnitude"


def magnitude_masks(
    weights: list[torch.Tensor], sparsity: float, scope: Scope
) -> list[torch.Tensor]:
    """Keep-masks (True = kept) removing exactly round(sparsity * n) smallest |w| of each
    layer (scope layer) or of all layers together (scope global); ties go by position.
    No floor: a layer may lose every weight (see ``keep_masks`` for ``min_density``)."""
    scores = [magnitude_scores(w) for w in weights]
    return keep_masks(scores, sparsity, scope, min_density=0.0, normalize=False)


@register(MagnitudeConfig, types=tuple(SPARSE_SWAPS))
def apply_magnitude(model: nn.Module, config: MagnitudeConfig, ctx: Context) -> nn.Module:
    return prune_unstructured(model, config, Magnitude(), ctx)
