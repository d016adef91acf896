"""Second-order statistics of a layer's inputs, shared by GPTQ and SparseGPT.

``H = 2 X^T X / N`` over the calibration rows ``X`` (N, K) a layer sees, accumulated as a
running mean; ``inverse_factor`` gives the upper Cholesky factor of the damped inverse that
both methods walk column by column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from slimkit.calib.sequential import (
    Group,
    PerInput,
    check_rows,
    columns,
    geometry,
    input_rows,
    quantize_sequential,
    require_rows,
)
from slimkit.context import Progress
from slimkit.data import Batch
from slimkit.select import swap_modules

#: how many times the damping is multiplied by 10 after the first try fails
DAMP_RETRIES = 4


class HessianError(ArithmeticError):
    """The Hessian cannot be factorized even with the largest damping tried."""


# -- pure math ---------------------------------------------------------------------------
def merge_hessian(h: torch.Tensor, n: int, xtx: torch.Tensor, m: int) -> tuple[torch.Tensor, int]:
    """Running mean of ``2 X^T X``: fold in ``xtx = X^T X`` of ``m`` more rows."""
    if m == 0:
        return h, n
    total = n + m
    return h * (n / total) + xtx * (2.0 / total), total


def accumulate_hessian(h: torch.Tensor, n: int, x_rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(h, n)`` updated with the rows ``x_rows`` (M, K): ``h`` stays the mean of
    ``2 x^T x`` over all ``n`` rows seen. Returns a new tensor."""
    x = x_rows.float()  # (M, K)
    return merge_hessian(h, n, x.T @ x, x.shape[0])  # (K, K)


def inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + d * mean(diag H) * I)^-1`` and the ``d`` used.

    ``d`` starts at ``damp`` and grows 10x per failed try (not positive definite, or a
    non-finite factor); ``HessianError`` after ``DAMP_RETRIES`` more tries.
    """
    k = h.shape[0]
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(k, dtype=h.dtype)
    d = damp
    for _ in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + (d * mean_diag) * eye)  # (K, K)
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            inverse = torch.cholesky_inverse(lower)  # (K, K)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)  # (K, K)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, d
        d *= 10.0
    raise HessianError(
        f"the Hessian is not positive definite even with damping {d / 10.0:g} x mean(diag)"
    )


def drop_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies of ``w`` (O, K) and ``h`` (K, K) in which every dead input (``H_jj = 0``:
    the channel never moved) has ``H_jj = 1`` and a zero weight column. ``ValueError`` when
    the shapes do not match."""
    o, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"a weight of shape {(o, k)} needs a ({k}, {k}) Hessian")
    w = w.detach().float().clone()  # (O, K)
    h = h.detach().float().clone()  # (K, K)
    dead = h.diagonal() == 0  # (K,)
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def input_size(module: nn.Module) -> int:
    """The length of one weight row: the dimension groups run along."""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"{type(module).__name__} has no weight")
    return int(weight[0].numel())


def uses_hessian(module: nn.Module) -> bool:
    """Linear layers and ungrouped convolutions get GPTQ; the rest round to nearest."""
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)


class Hessians:
    """The running ``2 X^T X / N`` of each watched layer (``X^T X`` of a tensor shared by
    several layers is computed once)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.h: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self._memo = PerInput()

    def watch(self, name: str, x: torch.Tensor) -> None:
        module = self.modules[name]

        def gram() -> tuple[torch.Tensor, int]:
            rows = input_rows(module, x)  # (M, K)
            return rows.T @ rows, rows.shape[0]  # (K, K)

        xtx, m = self._memo.get(x, geometry(module), gram)
        k = xtx.shape[0]
        h = self.h.get(name, torch.zeros(k, k))
        self.h[name], self.n[name] = merge_hessian(h, self.n.get(name, 0), xtx, m)

    def pop(self, name: str) -> torch.Tensor | None:
        self._memo.clear()
        return self.h.pop(name, None)

    def check_rows(self, group: Group, method: str, strict: bool) -> None:
        """``check_rows`` of every layer that saw input: a warning (DataError when
        ``strict``) for a Hessian of fewer rows than input columns."""
        for name, rows in self.n.items():
            if rows:
                where = group.full_name(name)
                check_rows(where, rows, columns(self.modules[name]), method, strict)


def require_hessian_rows(
    model: nn.Module, names: Sequence[str], data: Sequence[Batch], method: str
) -> None:
    """DataError before any work when a selected layer that gets a Hessian would see fewer
    calibration rows than it has input columns (one counting pass over ``data``)."""
    hessian = [n for n in dict.fromkeys(names) if uses_hessian(model.get_submodule(n))]
    require_rows(model, hessian, data, method)


#: ``make(group, name, module, hessian)``: the layer that replaces ``module``
HessianSwap = Callable[[Group, str, nn.Module, "torch.Tensor | None"], nn.Module]


def swap_with_hessians(
    model: nn.Module,
    names: Sequence[str],
    data: Sequence[Batch],
    method: str,
    strict: bool,
    make: HessianSwap,
    report: Progress,
) -> None:
    """Block by block (``quantize_sequential``): one run of the block collects the Hessian of
    each selected layer that gets one (``uses_hessian``), then every selected layer is
    replaced by ``make(group, name, module, hessian or None)``. With ``strict``, too few
    calibration rows for a layer is a DataError before any work (a warning otherwise)."""
    if strict:
        require_hessian_rows(model, names, data, method)

    def one_group(group: Group) -> None:
        modules = {n: group.root.get_submodule(n) for n in group.names}
        watched = [n for n, m in modules.items() if uses_hessian(m)]
        stats = Hessians({n: modules[n] for n in watched})
        if watched:
            with group.watching(stats.watch, watched):
                group.run()
        stats.check_rows(group, method, strict)

        def swap(name: str, module: nn.Module) -> nn.Module:
            return make(group, name, module, stats.pop(name) if name in watched else None)

        swap_modules(group.root, group.names, swap)

    quantize_sequential(model, names, data, one_group, report)
