"""Importance criteria: scores of weights or output channels (higher = more important).

Each criterion is a small ``Importance`` callable, ``criterion(model, names, ctx)`` -> one
score tensor per named layer, of the weight's shape (``Unit.WEIGHT``) or ``(C_out,)``
(``Unit.CHANNEL``, one score per filter of a Conv2d or output neuron of a Linear):

- ``magnitude``: ``|w|`` per weight;
- ``l1`` / ``l2``: the L1 / L2 norm of each output channel's weights;
- ``fpgm``: per filter, the summed Euclidean distance to every other filter of the layer;
  filters near the geometric median are the ones the others can stand in for: low score;
- ``wanda``: ``|w_ij| * ||x_j||_2`` per weight, ``x_j`` the input feeding column ``j`` over
  all calibration rows: a Linear's input feature ``j``; for a Conv2d the column ``j`` of the
  unfolded (im2col) input, input channel ``c`` at kernel offset ``(ki, kj)`` over every output
  position (zero padding counts as zeros), so each weight of a filter gets its own norm;
- ``taylor``: the first-order Taylor estimate of the loss change from removing a weight,
  ``|w * dL/dw|`` with ``L`` the cross-entropy of the model's logits on one labelled training
  batch, averaged over the task's ``train_data()`` batches; per channel, the absolute value of
  the channel's summed ``w * dL/dw`` (removing the whole channel at once), averaged likewise.

``keep_masks`` turns scores into keep-masks for a layer or a global budget with a per-layer
floor (``min_density``).
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.calib.capture import TrainBatch, labelled_batches, run_batches, watching
from slimkit.config import Scope
from slimkit.context import Context
from slimkit.data import Batch, call, first_tensor
from slimkit.model_info import eval_mode
from slimkit.train.optim import only_grad


class Unit(str, enum.Enum):
    """What one score rates."""

    WEIGHT = "weight"  # scores of the weight's shape
    CHANNEL = "channel"  # scores (C_out,): one per filter / output neuron


class Criterion(str, enum.Enum):
    MAGNITUDE, L1, L2, TAYLOR, FPGM, WANDA = "magnitude", "l1", "l2", "taylor", "fpgm", "wanda"


# -- pure math ---------------------------------------------------------------------------
def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|w|`` as float32, the weight's shape."""
    return w.detach().abs().float()


def channel_norms(w: torch.Tensor, p: int) -> torch.Tensor:
    """The L``p`` norm of each output channel's weights: (C_out,)."""
    return w.detach().float().reshape(w.shape[0], -1).norm(p=p, dim=1)


def fpgm_scores(w: torch.Tensor) -> torch.Tensor:
    """Each filter's summed Euclidean distance to all filters of the layer: (C_out,)."""
    f = w.detach().double().reshape(w.shape[0], -1)  # (C_out, K)
    dist = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")  # (C_out, C_out)
    return dist.sum(dim=1).float()


def wanda_scores(w: torch.Tensor, in_norms: torch.Tensor) -> torch.Tensor:
    """``|w| * ||x||``, ``in_norms`` broadcastable to the weight: the weight's shape."""
    return (w.detach().abs().double() * in_norms).float()


def input_sq_sums(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each input column of ``module`` over one batch ``x`` (float64):
    (K,) for a Linear, (C_in, kh, kw) for a Conv2d (columns of the unfolded input)."""
    if isinstance(module, nn.Conv2d):
        return _patch_sq_sums(module, x if x.dim() == 4 else x.unsqueeze(0))
    return x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0)  # (K,)


def _patch_sq_sums(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``F.unfold(x).pow(2).sum((0, 2))`` as (C_in, kh, kw), from strided slices of the
    padded squared input (never unfolding it)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = (int(p) for p in conv.padding)  # ints: conv_args refuses string padding
    sq = F.pad(x.detach().double().pow(2), (pw, pw, ph, ph)).sum(dim=0)  # (C, H + 2ph, W + 2pw)
    ho = (sq.shape[1] - dh * (kh - 1) - 1) // sh + 1  # output height
    wo = (sq.shape[2] - dw * (kw - 1) - 1) // sw + 1  # output width
    out = sq.new_zeros(sq.shape[0], kh, kw)  # (C, kh, kw)
    for i in range(kh):
        for j in range(kw):
            r, c = i * dh, j * dw
            window = sq[:, r : r + sh * (ho - 1) + 1 : sh, c : c + sw * (wo - 1) + 1 : sw]
            out[:, i, j] = window.sum(dim=(1, 2))
    return out


def weight_shaped_norms(module: nn.Module, sq_sums: torch.Tensor) -> torch.Tensor:
    """``sqrt(sq_sums)`` laid out to broadcast against the weight: (1, K) for a Linear,
    (C_out, C_in / groups, kh, kw) for a Conv2d (each filter sees its group's channels)."""
    norms = sq_sums.sqrt()
    if isinstance(module, nn.Conv2d):
        g, (kh, kw) = module.groups, module.kernel_size
        per_group = norms.reshape(g, -1, kh, kw)  # (g, C_in / g, kh, kw)
        return per_group.repeat_interleave(module.out_channels // g, dim=0)
    return norms.reshape(1, -1)


# -- turning scores into keep-masks -------------------------------------------------------
def min_keep(n: int, min_density: float) -> int:
    """How many of a layer's ``n`` scores ``min_density`` keeps at least: ceil(density * n)."""
    return min(n, math.ceil(round(min_density * n, 9)))


def keep_masks(
    scores: Sequence[torch.Tensor],
    sparsity: float,
    scope: Scope,
    min_density: float = 0.01,
    normalize: bool = True,
) -> list[torch.Tensor]:
    """Keep-masks (True = kept), one per score tensor, of the scores' shapes.

    Scope layer: each layer drops its ``round(sparsity * n)`` lowest scores. Scope global:
    the ``round(sparsity * N)`` lowest of all ``N`` scores go, compared after dividing each
    layer's scores by their mean when ``normalize`` is set (a layer whose scores are all
    ``c`` times another's then competes as an equal; a layer of zeros stays at zero). Either
    way every layer keeps at least its ``min_keep(n, min_density)`` highest scores; in global
    scope the others make up for the layers so held back, so the total stays exact when it
    can. Ties go by position (earlier positions go first).
    """
    flat = [s.detach().reshape(-1).double() for s in scores]
    floors = [min_keep(s.numel(), min_density) for s in flat]
    if scope is Scope.GLOBAL:
        if normalize:
            flat = [s / s.mean() if float(s.mean()) > 0 else s for s in flat]
        held = [_hold_top(s, f) for s, f in zip(flat, floors, strict=True)]
        total = sum(s.numel() for s in flat)
        k = min(round(sparsity * total), total - sum(floors))
        keep = _drop_lowest(torch.cat(held), k)
        keeps = list(torch.split(keep, [s.numel() for s in flat]))
    else:
        keeps = [
            _drop_lowest(s, min(round(sparsity * s.numel()), s.numel() - f))
            for s, f in zip(flat, floors, strict=True)
        ]
    return [k.reshape(s.shape) for k, s in zip(keeps, scores, strict=True)]


def _hold_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``scores`` (1-D) with its ``count`` highest set to +inf (never dropped)."""
    held = scores.clone()
    if count:
        held[torch.argsort(scores, stable=True)[-count:]] = math.inf
    return held


def _drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over ``scores`` (1-D) dropping the ``k`` lowest."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[: max(k, 0)]] = False
    return keep


# -- criteria ----------------------------------------------------------------------------
def unique_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` with each module once (under its first name)."""
    first: dict[int, str] = {}
    for name in names:
        first.setdefault(id(model.get_submodule(name)), name)
    return list(first.values())


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    weight = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"layer {name!r} has no weight to score")
    return weight


def zero_pruned(model: nn.Module, names: Sequence[str], keeps: Sequence[torch.Tensor]) -> None:
    """Set the weights of each named layer that its keep mask drops to exactly zero."""
    with torch.no_grad():
        for name, keep in zip(names, keeps, strict=True):
            weight_of(model, name).mul_(keep)


class Importance(abc.ABC):
    """Scores the weights or output channels of named layers; higher = more important."""

    unit: Unit = Unit.WEIGHT
    #: whether global selection divides each layer's scores by their mean (``keep_masks``)
    normalize: ClassVar[bool] = True

    @abc.abstractmethod
    def __call__(
        self, model: nn.Module, names: Sequence[str], ctx: Context
    ) -> dict[str, torch.Tensor]:
        """One score tensor per name (each name a distinct module)."""


class WeightCriterion(Importance):
    """A criterion computed from each layer's weight alone."""

    def __call__(
        self, model: nn.Module, names: Sequence[str], ctx: Context
    ) -> dict[str, torch.Tensor]:
        return {name: self.score(weight_of(model, name)) for name in names}

    @abc.abstractmethod
    def score(self, w: torch.Tensor) -> torch.Tensor: ...


class Magnitude(WeightCriterion):
    """``|w|``; not normalised in global scope: weights of all layers share one scale."""

    normalize = False

    def score(self, w: torch.Tensor) -> torch.Tensor:
        return magnitude_scores(w)


class ChannelNorm(WeightCriterion):
    """The L``p`` norm of each output channel."""

    unit = Unit.CHANNEL

    def __init__(self, p: int) -> None:
        self.p = p

    def score(self, w: torch.Tensor) -> torch.Tensor:
        return channel_norms(w, self.p)


class FPGM(WeightCriterion):
    """Summed distance of each filter to the layer's other filters."""

    unit = Unit.CHANNEL

    def score(self, w: torch.Tensor) -> torch.Tensor:
        return fpgm_scores(w)


class Wanda(Importance):
    """``|w| * ||x||`` with input norms over the calibration data."""

    def __call__(
        self, model: nn.Module, names: Sequence[str], ctx: Context
    ) -> dict[str, torch.Tensor]:
        norms = input_norms(model, names, ctx.need_data("wanda importance"))
        for name in names:
            if not bool(norms[name].any()):
                ctx.report(
                    f"warning: wanda: {name} got no nonzero calibration input; all its "
                    "scores are 0 (ties: earlier weights go first)"
                )
        return {name: wanda_scores(weight_of(model, name), norms[name]) for name in names}


def input_norms(
    model: nn.Module, names: Sequence[str], data: Sequence[Batch]
) -> dict[str, torch.Tensor]:
    """Per named layer, the L2 norm of each input column over ``data``, shaped to broadcast
    against its weight (``weight_shaped_norms``); a layer the data never reaches gets zeros."""
    modules = {name: model.get_submodule(name) for name in names}
    sums: dict[str, torch.Tensor] = {}

    def watch(name: str, x: torch.Tensor) -> None:
        s = input_sq_sums(modules[name], x)
        sums[name] = sums[name] + s if name in sums else s

    with watching(model, names, watch):
        run_batches(model, data)
    return {
        name: weight_shaped_norms(m, sums.get(name, _zero_sums(m))) for name, m in modules.items()
    }


def _zero_sums(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return torch.zeros(module.in_channels, *module.kernel_size, dtype=torch.float64)
    return torch.zeros(int(getattr(module, "in_features", 0)), dtype=torch.float64)


class Taylor(Importance):
    """First-order Taylor ``|w * dL/dw|`` over the task's labelled batches, per weight or
    per channel; not normalised in global scope: every score estimates a change of one loss."""

    normalize = False

    def __init__(self, unit: Unit = Unit.WEIGHT) -> None:
        self.unit = Unit(unit)

    def __call__(
        self, model: nn.Module, names: Sequence[str], ctx: Context
    ) -> dict[str, torch.Tensor]:
        batches = labelled_batches(model, ctx, "taylor importance")
        weights = [weight_of(model, name) for name in names]
        totals = taylor_sums(model, weights, batches, self.unit)
        return {name: (t / len(batches)).float() for name, t in zip(names, totals, strict=True)}


def taylor_sums(
    model: nn.Module, weights: Sequence[torch.Tensor], batches: Sequence[TrainBatch], unit: Unit
) -> list[torch.Tensor]:
    """Per weight tensor, the sum over ``batches`` of ``|w * dL/dw|`` (unit weight) or of
    ``|sum over each channel of w * dL/dw|`` (unit channel), ``L`` the batch's cross-entropy.

    The model runs in eval mode (mode flags restored after); only ``weights`` get gradients
    and no ``.grad`` is left on any tensor."""
    totals = [torch.zeros(_score_shape(w, unit), dtype=torch.float64) for w in weights]
    with eval_mode(model), only_grad(model, weights), torch.enable_grad():
        for inputs, labels in batches:
            loss = F.cross_entropy(first_tensor(call(model, inputs)), labels)
            grads = torch.autograd.grad(loss, list(weights), allow_unused=True)
            for total, w, g in zip(totals, weights, grads, strict=True):
                if g is not None:
                    total += _taylor_term(w.detach() * g, unit)
    return totals


def _taylor_term(wg: torch.Tensor, unit: Unit) -> torch.Tensor:
    """``|w * g|`` per weight, or ``|sum of w * g|`` per output channel (float64)."""
    wg = wg.double()
    return wg.abs() if unit is Unit.WEIGHT else wg.reshape(wg.shape[0], -1).sum(dim=1).abs()


def _score_shape(w: torch.Tensor, unit: Unit) -> tuple[int, ...]:
    return tuple(w.shape) if unit is Unit.WEIGHT else (w.shape[0],)


def importance(criterion: Criterion | str, unit: Unit | str | None = None) -> Importance:
    """The criterion of that name; ``unit`` chooses taylor's (weight by default) and must
    match the others' own unit when given."""
    c = Criterion(criterion)
    made: Importance
    if c is Criterion.TAYLOR:
        made = Taylor(Unit(unit) if unit is not None else Unit.WEIGHT)
    else:
        made = _FIXED[c]()
    if unit is not None and made.unit is not Unit(unit):
        raise ValueError(f"criterion {c.value!r} scores per {made.unit.value}, not per {unit}")
    return made


_FIXED = {
    Criterion.MAGNITUDE: Magnitude,
    Criterion.L1: lambda: ChannelNorm(1),
    Criterion.L2: lambda: ChannelNorm(2),
    Criterion.FPGM: FPGM,
    Criterion.WANDA: Wanda,
}
