"""GPTQ: weight-only quantization that compensates each rounding error in later columns.

For a layer ``y = x W^T`` with calibration inputs ``X`` (N, K), the output error of a
quantized ``Q`` is ``tr((W - Q) H (W - Q)^T) / 2`` with ``H = 2 X^T X / N``. Columns are
quantized one at a time; the error of column ``j``, divided by the ``j``-th diagonal entry
of the upper Cholesky factor ``U`` of ``H^-1``, is spread over the columns still to come
along row ``j`` of ``U`` (the optimal update of Optimal Brain Surgeon). Updates are applied
lazily: inside a block of ``block_size`` columns at once, beyond it after the block.

- Damping: ``damp * mean(diag H)`` is added to the diagonal; when the factorization still
  fails (a singular or indefinite ``H``) the damping grows 10x per try, then ``HessianError``.
- Dead inputs (a zero diagonal entry: the input channel never moved) get ``H_jj = 1`` and a
  zero weight column.
- Group parameters are computed from the group's current (error-updated) columns when the
  first of them is reached; per-channel and per-tensor parameters from ``W`` at the start.
- ``act_order`` visits columns by decreasing ``H_jj``; groups stay the contiguous runs of
  the original column order (so the stored (R, G) scales keep their meaning), and the codes
  are returned in the original order.
- When ``group_size`` does not divide K the last group of each row is shorter
  (``ceil(K / group_size)`` groups), its parameters from its own columns only.

Linear and Conv2d layers (groups=1; a Conv2d's inputs are unfolded so ``H`` is over
``C_in * kh * kw``) get GPTQ; Embedding layers and grouped convolutions have no such
Hessian and are rounded to nearest at the same settings.

A layer whose Hessian saw fewer calibration rows than it has input columns gets a warning
naming it and the rows needed; with ``strict: true`` that is a DataError, raised before
any layer changes (one counting pass over the data first).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from slimkit.calib.hessian import (
    HessianError,
    drop_dead_inputs,
    inverse_factor,
    swap_with_hessians,
    uses_hessian,
)
from slimkit.calib.sequential import (
    Group,
)
from slimkit.context import Context
from slimkit.formats import primitives as P
from slimkit.quant.common import WeightQuantConfig, empty_twin
from slimkit.registry import register


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    symmetric: bool,
    per_channel: bool = True,
    group_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``w`` (O, K) for inputs of Hessian ``h`` (K, K) (see the module docstring).

    Returns int8 codes (O, K) in the original column order, the scale (R, G) and the zero
    point (R, G), or None when ``symmetric``. Raises ``HessianError`` when ``h`` cannot be
    factorized, ``ValueError`` for mismatched shapes or a group size that is not a positive
    integer.
    """
    w, h = drop_dead_inputs(w, h)  # (O, K), (K, K)
    if group_size is not None:
        P.check_group_size(group_size)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    upper, _ = inverse_factor(h, damp)  # (K, K)
    solver = _Columns(w, upper, bits, symmetric, per_channel, group_size, perm)
    codes = solver.run(max(1, block_size))  # (O, K), permuted order
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, solver.scale, None if symmetric else solver.zero


class _Columns:
    """State of one GPTQ run over the (possibly permuted) columns of ``w``."""

    def __init__(
        self,
        w: torch.Tensor,
        upper: torch.Tensor,
        bits: int,
        symmetric: bool,
        per_channel: bool,
        group_size: int | None,
        perm: torch.Tensor | None,
    ) -> None:
        self.w, self.upper = w, upper  # (O, K), (K, K)
        self.bits, self.symmetric, self.group_size = bits, symmetric, group_size
        o, k = w.shape
        self.k = k
        if group_size is None:
            # per channel / per tensor: parameters of the whole (dead-zeroed) weight
            self.scale, self.zero = P.qparams(w, bits, symmetric, per_channel)  # (R, 1)
            self.group_of = torch.zeros(k, dtype=torch.long)  # (K,)
        else:
            n_groups = P.n_groups(k, group_size)  # the last one shorter when ragged
            self.scale = torch.ones(o, n_groups)  # (O, G)
            self.zero = torch.zeros(o, n_groups)  # (O, G)
            original = perm if perm is not None else torch.arange(k)  # column j is original[j]
            self.group_of = original // group_size  # (K,) group of each visited column
            self.position = torch.argsort(original)  # (K,) visit position of original column
        self.ready = torch.zeros(self.scale.shape[1], dtype=torch.bool)  # (G,)

    def run(self, block_size: int) -> torch.Tensor:
        codes = torch.zeros(self.w.shape, dtype=torch.int8)  # (O, K)
        for i1 in range(0, self.k, block_size):
            i2 = min(i1 + block_size, self.k)
            self._block(i1, i2, codes)
        return codes

    def _block(self, i1: int, i2: int, codes: torch.Tensor) -> None:
        """Quantize columns i1..i2, then apply their errors to the columns after i2."""
        w1 = self.w[:, i1:i2].clone()  # (O, B)
        err = torch.zeros_like(w1)  # (O, B)
        u1 = self.upper[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            g = int(self.group_of[i1 + i])
            if self.group_size is not None and not bool(self.ready[g]):
                self._group_params(g, i1, i2, i, w1, err)
            scale, zero = self._params(g)  # (R, 1) each
            column = w1[:, i : i + 1]  # (O, 1)
            q = P.quantize(column, scale, zero, self.bits, self.symmetric)  # (O, 1)
            e = (column - P.dequantize(q, scale, zero)) / u1[i, i]  # (O, 1)
            w1[:, i:] -= e * u1[i : i + 1, i:]  # (O, B - i)
            err[:, i : i + 1] = e
            codes[:, i1 + i : i1 + i + 1] = q
        self.w[:, i2:] -= err @ self.upper[i1:i2, i2:]  # (O, K - i2)

    def _params(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.group_size is None:
            return self.scale, self.zero
        return self.scale[:, g : g + 1], self.zero[:, g : g + 1]

    def _group_params(
        self, g: int, i1: int, i2: int, i: int, w1: torch.Tensor, err: torch.Tensor
    ) -> None:
        """Parameters of group ``g`` from the current values of its columns, none of which
        is quantized yet: inside the block from ``w1``, beyond it with the pending updates
        of the block's first ``i`` columns applied."""
        assert self.group_size is not None
        start = g * self.group_size
        # (g,) visit positions; fewer for a short last group (the slice stops at K)
        pos = self.position[start : start + self.group_size]
        inside = pos < i2
        current = torch.empty(self.w.shape[0], pos.numel())  # (O, g)
        current[:, inside] = w1[:, pos[inside] - i1]
        beyond = pos[~inside]
        pending = err[:, :i] @ self.upper[i1 : i1 + i, beyond]  # (O, n_beyond)
        current[:, ~inside] = self.w[:, beyond] - pending
        scale, zero = P.params_from_range(
            current.amin(dim=1), current.amax(dim=1), self.bits, self.symmetric
        )  # (O,) each
        self.scale[:, g], self.zero[:, g] = scale, zero
        self.ready[g] = True


# -- config and handler --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GPTQConfig(WeightQuantConfig):
    """GPTQ weight-only quantization from calibration data (see the module docstring)."""

    method = "gptq"

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    #: too few calibration rows for a layer's Hessian is an error, not a warning
    strict: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.damp <= 1.0:
            self.fail("damp", "a number in (0, 1]")
        if self.block_size < 1:
            self.fail("block_size", "a positive integer")


@register(GPTQConfig, types=(nn.Linear, nn.Conv2d, nn.Embedding))
def apply_gptq(model: nn.Module, config: GPTQConfig, ctx: Context) -> nn.Module:
    data = ctx.need_data("gptq")
    config.check(model, ctx.names)
    quant = config.quant_kwargs()

    def make(group: Group, name: str, module: nn.Module, h: torch.Tensor | None) -> nn.Module:
        q = empty_twin(module, **quant)
        weight: Any = module.weight
        if h is None:
            if uses_hessian(module):
                ctx.report(
                    f"gptq: {group.full_name(name)} saw no calibration input; rounded to nearest"
                )
            q.set_weight(weight)
            return q
        w = weight.detach().reshape(weight.shape[0], -1)  # (O, K)
        try:
            codes, scale, zero = gptq_quantize(
                w,
                h,
                config.bits,
                config.symmetric,
                quant["per_channel"],
                config.group_size,
                config.damp,
                config.act_order,
                config.block_size,
            )
        except HessianError as e:
            ctx.report(f"warning: gptq: {group.full_name(name)}: {e}; rounded to nearest")
            q.set_weight(weight)
            return q
        q.set_quantized(codes.reshape(weight.shape), scale, zero)
        return q

    swap_with_hessians(model, ctx.names, data, "GPTQ", config.strict, make, ctx.report)
    return model
