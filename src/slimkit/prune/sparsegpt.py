"""SparseGPT: one-shot pruning that compensates each removed weight in later columns.

For a layer ``y = x W^T`` with calibration inputs of Hessian ``H = 2 X^T X / N`` (GPTQ's,
accumulated the same way), let ``U`` be the upper Cholesky factor of ``H^-1``. Columns are
visited in order; removing weight ``w_ij`` costs ``w_ij^2 / U_jj^2`` of output error (the
Optimal Brain Surgeon saliency: ``U_jj^2`` is ``[H_F^-1]_jj`` over the columns ``F`` not yet
visited), and its optimal compensation is GPTQ's update with the error ``w_ij / U_jj``
spread along row ``j`` of ``U``. Updates are lazy: inside a block of ``block_size`` columns
at once, beyond it after the block. The mask is chosen as the columns are reached, from the
current (already compensated) weights:

- unstructured: when a block starts, the weights of lowest saliency among all rows and
  columns of the block are pruned (per-block selection, so rows may end with different
  densities). Block ``[i1, i2)`` prunes ``round(s * O * i2) - round(s * O * i1)`` weights,
  so each layer loses exactly ``round(s * O * K)``, as magnitude pruning does.
- N:M: when the first column of a group of ``m`` consecutive columns is reached, each row
  keeps the ``n`` weights of highest saliency in it. ``block_size`` is rounded down to a
  multiple of ``m`` (at least ``m``) so that no group straddles two blocks.

Ties in saliency go by position: the earlier weight is pruned first. Damping and dead
inputs are GPTQ's: ``damp * mean(diag H)`` on the diagonal, growing 10x per failed
factorization, then ``HessianError``; an input that never moved gets ``H_jj = 1`` and a zero
weight column (its zeros count among the pruned weights, so such a layer may end sparser).

With a diagonal ``H``, ``U`` is diagonal and no error is propagated: the kept weights are
returned unchanged. With equal diagonal entries (``H = c I``) every ``U_jj`` is equal, the
saliency orders the weights exactly as ``|w|`` does (it is computed in float64), and the
result is magnitude pruning: N:M exactly magnitude N:M; unstructured exactly magnitude
pruning of the layer when ``block_size >= K``, otherwise of each block at its share.

Linear layers and ungrouped Conv2d layers (inputs unfolded, ``K = C_in * kh * kw``; the N:M
groups run along ``weight.reshape(O, -1)``, i.e. over ``(C_in, kh, kw)`` in that order) get
SparseGPT from block-by-block calibration (``quant/sequential.py``). Grouped convolutions,
layers that saw no calibration input and layers whose Hessian cannot be factorized are
pruned by magnitude at the same setting, with a line in the report. The result is stored
as ``SparseLinear`` / ``SparseConv2d`` (nonzero values + bitmask). A layer whose Hessian saw
fewer calibration rows than it has input columns gets a warning (a DataError before any
layer changes with ``strict: true``), as in GPTQ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from slimkit.calib.hessian import (
    HessianError,
    drop_dead_inputs,
    input_size,
    inverse_factor,
    swap_with_hessians,
    uses_hessian,
)
from slimkit.calib.sequential import Group
from slimkit.compressed import conv_args
from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.errors import ConfigError
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.prune.nm import check_m_divides
from slimkit.registry import register

#: unstructured sparsity when neither ``sparsity`` nor ``n``/``m`` is given
DEFAULT_SPARSITY = 0.5

NM = tuple[int, int]


# -- mask selection ------------------------------------------------------------------------
def keep_all_but_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of ``scores``' shape, False at its ``count`` smallest entries (ties by
    row-major position: the earlier is dropped first)."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:count]] = False
    return keep.reshape(scores.shape)


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of ``scores`` (O, K), True at the ``n`` largest of every ``m`` consecutive
    entries of each row (ties: the earlier is dropped first). ``m`` must divide K."""
    o, k = scores.shape
    groups = scores.reshape(o, k // m, m)  # (O, K/m, m)
    lowest = torch.argsort(groups, dim=2, stable=True)[..., : m - n]  # (O, K/m, m-n)
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(2, lowest, False)
    return keep.reshape(o, k)


def magnitude_keep(w: torch.Tensor, sparsity: float, nm: NM | None = None) -> torch.Tensor:
    """Keep-mask of magnitude pruning at the same setting: the ``round(sparsity * numel)``
    smallest ``|w|`` of the layer removed, or with ``nm`` the ``m - n`` smallest of every
    ``m`` consecutive weights of each row of ``w.reshape(O, -1)``."""
    scores = w.detach().abs().float()
    if nm is not None:
        return keep_n_of_m(scores.reshape(w.shape[0], -1), *nm).reshape(w.shape)
    return keep_all_but_lowest(scores, round(sparsity * scores.numel()))


def saliency(w: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
    """OBS error of removing each weight of ``w`` (O, B) alone: ``w^2 / U_jj^2`` (float64,
    so that equal ``U_jj`` order the weights exactly as ``|w|`` does)."""
    return (w.double() / u_diag.double()) ** 2  # (O, B)


# -- pure math -----------------------------------------------------------------------------
def check_nm(k: int, nm: NM) -> None:
    """ValueError unless ``nm = (n, m)`` has ``0 < n < m`` and ``m`` divides ``k``."""
    n, m = nm
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m, got {n}:{m}")
    if k % m:
        raise ValueError(f"m {m} does not divide the input size {k}")


def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float = DEFAULT_SPARSITY,
    nm: NM | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``w`` (O, K) for inputs of Hessian ``h`` (K, K) (see the module docstring):
    ``sparsity`` of the weights, or with ``nm = (n, m)`` all but ``n`` of every ``m``
    (``sparsity`` is then unused).

    Returns the pruned weight (O, K), exactly 0.0 wherever the returned keep mask (O, K)
    is False. Raises ``HessianError`` when ``h`` cannot be factorized, ``ValueError`` for
    mismatched shapes or an N:M that does not fit K.
    """
    w, h = drop_dead_inputs(w, h)  # (O, K), (K, K)
    o, k = w.shape
    if nm is not None:
        check_nm(k, nm)
        step = max(nm[1], block_size // nm[1] * nm[1])
    else:
        step = max(1, block_size)
    upper, _ = inverse_factor(h, damp)  # (K, K)
    keep = torch.ones(o, k, dtype=torch.bool)  # (O, K)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        count = round(sparsity * (o * i2)) - round(sparsity * (o * i1))
        _prune_block(w, upper, keep, i1, i2, count if nm is None else nm)
    return w.masked_fill_(~keep, 0.0), keep


def _prune_block(
    w: torch.Tensor,
    upper: torch.Tensor,
    keep: torch.Tensor,
    i1: int,
    i2: int,
    rule: int | NM,
) -> None:
    """Choose the mask of columns i1..i2 (``rule``: how many weights the block prunes, or
    N:M), remove them with compensation inside the block, then apply their errors to the
    columns after i2."""
    w1 = w[:, i1:i2].clone()  # (O, B)
    u1 = upper[i1:i2, i1:i2]  # (B, B)
    d = u1.diagonal()  # (B,)
    keep1 = keep[:, i1:i2]  # (O, B), a view of ``keep``
    if isinstance(rule, int):
        keep1[:] = keep_all_but_lowest(saliency(w1, d), rule)
    err = torch.zeros_like(w1)  # (O, B)
    for i in range(i2 - i1):
        if not isinstance(rule, int) and i % rule[1] == 0:
            j = i + rule[1]
            keep1[:, i:j] = keep_n_of_m(saliency(w1[:, i:j], d[i:j]), *rule)
        column = w1[:, i : i + 1]  # (O, 1)
        e = torch.where(keep1[:, i : i + 1], 0.0, column) / u1[i, i]  # (O, 1)
        w1[:, i:] -= e * u1[i : i + 1, i:]  # (O, B - i)
        err[:, i : i + 1] = e
    w[:, i1:i2] = w1
    w[:, i2:] -= err @ upper[i1:i2, i2:]  # (O, K - i2)


# -- config and handler --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SparseGPTConfig(StageConfig):
    """SparseGPT one-shot pruning from calibration data (see the module docstring):
    ``sparsity`` of each layer's weights (unstructured, default 0.5), or ``n`` kept of every
    ``m`` consecutive weights of a row (N:M, e.g. 2:4)."""

    kind = "prune"
    method = "sparsegpt"

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    block_size: int = 128
    damp: float = 0.01
    #: too few calibration rows for a layer's Hessian is an error, not a warning
    strict: bool = False

    def __post_init__(self) -> None:
        if self.sparsity is None and self.n is None and self.m is None:
            object.__setattr__(self, "sparsity", DEFAULT_SPARSITY)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.n is None and self.m is None:
            if self.sparsity is None or not 0.0 <= self.sparsity < 1.0:
                self.fail("sparsity", "a fraction in [0, 1)")
        else:
            if self.sparsity is not None:
                self.fail("sparsity", "null when n and m are given (N:M prunes m - n of m)")
            if self.m is None or self.m < 2:
                self.fail("m", "an integer >= 2, given together with n")
            if self.n is None or not 0 < self.n < self.m:
                self.fail("n", f"an integer with 0 < n < m ({self.m}), given together with m")
        if not 0.0 < self.damp <= 1.0:
            self.fail("damp", "a number in (0, 1]")
        if self.block_size < 1:
            self.fail("block_size", "a positive integer")

    @property
    def nm(self) -> NM | None:
        return None if self.n is None or self.m is None else (self.n, self.m)

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        """ConfigError before any work (``check_layers``)."""
        check_layers(model, names, self)


_SWAPS: dict[type[nn.Module], type[SparseLinear | SparseConv2d]] = {
    nn.Linear: SparseLinear,
    nn.Conv2d: SparseConv2d,
}


def check_layers(model: nn.Module, names: Sequence[str], config: SparseGPTConfig) -> None:
    """ConfigError before any work: a convolution the sparse layers cannot hold, or the
    selected layers whose input size ``m`` does not divide (all of them listed)."""
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d):
            try:
                conv_args(module)
            except ValueError as e:
                raise ConfigError(f"layer {name!r} cannot be pruned by sparsegpt: {e}") from None
    if config.m is None:
        return
    check_m_divides(
        {name: input_size(m) for name, m in modules.items()}, config.m, "prune.sparsegpt"
    )


@register(SparseGPTConfig, types=tuple(_SWAPS))
def apply_sparsegpt(model: nn.Module, config: SparseGPTConfig, ctx: Context) -> nn.Module:
    data = ctx.need_data("sparsegpt")
    config.check(model, ctx.names)

    def make(group: Group, name: str, module: nn.Module, h: torch.Tensor | None) -> nn.Module:
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        with torch.no_grad():
            weight.copy_(_prune_layer(group.full_name(name), module, h, config, ctx))
        return _SWAPS[type(module)].from_float(module)  # type: ignore[arg-type]

    swap_with_hessians(model, ctx.names, data, "SparseGPT", config.strict, make, ctx.report)
    return model


def _prune_layer(
    name: str, module: nn.Module, h: torch.Tensor | None, config: SparseGPTConfig, ctx: Context
) -> torch.Tensor:
    """The pruned weight of ``module`` (its own shape): SparseGPT with ``h``, magnitude
    pruning (and a line in the report) when there is no usable Hessian."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    sparsity = config.sparsity or 0.0
    if h is None:
        why = "saw no calibration input" if uses_hessian(module) else "is a grouped Conv2d"
        ctx.report(f"sparsegpt: {name} {why}; pruned by magnitude")
    else:
        w = weight.detach().reshape(weight.shape[0], -1)  # (O, K)
        try:
            pruned, _ = sparsegpt_prune(w, h, sparsity, config.nm, config.damp, config.block_size)
            return pruned.reshape(weight.shape)
        except HessianError as e:
            ctx.report(f"warning: sparsegpt: {name}: {e}; pruned by magnitude")
    keep = magnitude_keep(weight, sparsity, config.nm)
    return weight.detach().float().masked_fill(~keep, 0.0)
