"""AWQ: activation-aware weight quantization with a searched per-input-channel scale.

Input channels that carry large activations matter most for the output. For a layer
``y = x W^T`` AWQ quantizes ``W * s`` (column ``j`` scaled by ``s_j``) and computes with
``Q(W * s) / s``, so salient columns are scaled up before rounding and lose less:

- ``s = m^alpha`` normalised to ``sqrt(max(s) * min(s)) = 1``, ``m`` the mean ``|x|`` per
  input channel over the calibration data; ``alpha`` is searched on the grid
  ``0, 1/n_grid, ..., 1`` for the smallest output error ``||X W^T - X (Q(W s) / s)^T||^2``
  on a subsample of calibration rows (``alpha = 0`` is plain round-to-nearest, so the
  search never does worse than it on those rows);
- with ``clip``, each group's range (per row, or the whole tensor for per-tensor scales) is
  then shrunk by a ratio in ``1, 1 - 0.5 / n_grid, ..., 0.5`` chosen for the smallest error
  of that group's share of the output (cross-group terms ignored); the clipped ranges are
  kept when they lower the whole output error.

The output error of a weight difference ``D`` is ``tr(D G D^T)`` with ``G = X^T X`` over the
sampled rows, so each candidate costs one (O, K) x (K, K) product. The stored layer holds the
codes of ``W * s`` and ``in_scale = 1 / s`` (``input_scaling=True``).

Each layer gets its own ``s`` (it is folded into the layer, not into a previous one); layers
fed the same tensor (query, key, value) share the collection of their statistics. Linear
and Conv2d layers (groups=1, one ``s`` per input channel) get AWQ; Embedding layers and
grouped convolutions are rounded to nearest at the same settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from slimkit.calib.capture import channel_rows
from slimkit.calib.sequential import Group, PerInput, geometry, input_rows, quantize_sequential
from slimkit.context import Context
from slimkit.formats import primitives as P
from slimkit.formats.base import Scheme
from slimkit.quant.common import WeightQuantConfig, empty_twin
from slimkit.registry import register
from slimkit.select import swap_modules

_FLOOR = 1e-4  # smallest channel magnitude, relative to the largest, before the power
MAX_SHRINK = 0.5  # the clip search goes down to half of each group's range
SAMPLE_SEED = 0


# -- pure math ---------------------------------------------------------------------------
def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s`` (K,) = ``x_mean ** alpha`` normalised so that ``max(s) * min(s) = 1``.

    Magnitudes are floored at ``1e-4`` of the largest (a channel that never moved still
    gets a finite, positive scale); ``alpha = 0`` gives exactly ones.
    """
    m = x_mean.float()
    floor = max(float(m.max()) * _FLOOR, torch.finfo(torch.float32).tiny)
    s = m.clamp(min=floor).pow(alpha)  # (K,)
    return s / (s.max() * s.min()).sqrt()


def _cells(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``w`` (O, K) viewed as (R, G, n): the cells that share one scale (a short last group
    padded with its own last value, which leaves its min and max unchanged)."""
    return P.group_view(w, scheme.per_channel, scheme.group_size)  # (R, G, n)


def quantize_clipped(
    w: torch.Tensor, scheme: Scheme, ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (O, K), scale and zero point (R, G) of ``w`` (O, K) from each cell's range
    shrunk by ``ratio`` (a number or (R, G)); values beyond the range are clamped."""
    cells = _cells(w.float(), scheme)  # (R, G, n)
    lo, hi = cells.amin(dim=2) * ratio, cells.amax(dim=2) * ratio  # (R, G) each
    scale, zero = P.params_from_range(lo, hi, scheme.bits, scheme.symmetric)  # (R, G) each
    codes = P.quantize(w, scale, zero, scheme.bits, scheme.symmetric, scheme.group_size)
    return codes, scale, zero


def output_error(d: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X D^T||^2 = tr(D G D^T)`` for a weight difference ``d`` (O, K), ``G = X^T X``."""
    return float(((d @ gram) * d).sum())


def cell_errors(d: torch.Tensor, gram: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Each cell's own share of the output error, cross-cell terms left out: (R, G)."""
    o, k = d.shape
    size = scheme.group_size if scheme.group_size is not None else k
    n = P.n_groups(k, size) if k else 0
    pad = n * size - k  # a short last group: zero columns of d and G add nothing
    if pad:
        d = torch.nn.functional.pad(d, (0, pad))  # (O, G * g)
        gram = torch.nn.functional.pad(gram, (0, pad, 0, pad))  # (G * g, G * g)
    parts = d.reshape(o, n, size)  # (O, G, g)
    blocks = gram.reshape(n, size, n, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, g, g)
    err = torch.einsum("ogi,gij,ogj->og", parts, blocks, parts)  # (O, G)
    if scheme.group_size is None and not scheme.per_channel:
        return err.sum().reshape(1, 1)
    return err


def search_alpha(
    w: torch.Tensor, gram: torch.Tensor, x_mean: torch.Tensor, scheme: Scheme, n_grid: int
) -> torch.Tensor:
    """The scale ``s`` (K,) of the grid's ``alpha`` with the smallest output error."""
    best_err, best_s = float("inf"), torch.ones(w.shape[1])
    for i in range(n_grid + 1):
        s = awq_scales(x_mean, i / n_grid)  # (K,)
        codes, scale, zero = quantize_clipped(w * s, scheme)
        w_hat = P.dequantize(codes, scale, zero, scheme.group_size) / s  # (O, K)
        err = output_error(w - w_hat, gram)
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def search_clip(w: torch.Tensor, gram: torch.Tensor, scheme: Scheme, n_grid: int) -> torch.Tensor:
    """Per-cell shrink ratio (R, G) in ``[MAX_SHRINK, 1]`` minimising each cell's error."""
    best_err: torch.Tensor | None = None
    best_ratio = torch.ones(1)
    for i in range(n_grid + 1):
        r = 1.0 - MAX_SHRINK * i / n_grid
        codes, scale, zero = quantize_clipped(w, scheme, r)
        err = cell_errors(w - P.dequantize(codes, scale, zero, scheme.group_size), gram, scheme)
        if best_err is None:
            best_err, best_ratio = err, torch.ones_like(err)
            continue
        better = err < best_err  # (R, G)
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(err, r), best_ratio)
    return best_ratio


def awq_quantize(
    w: torch.Tensor,
    gram: torch.Tensor,
    x_mean: torch.Tensor,
    scheme: Scheme,
    n_grid: int = 20,
    clip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """AWQ of ``w`` (O, K) given the sampled inputs' ``gram`` = X^T X (K, K) and the mean
    ``|x|`` per column ``x_mean`` (K,).

    Returns codes of ``W * s`` (O, K), scale and zero point (R, G) (zero None when
    ``symmetric``) and ``s`` (K,): the layer computes with ``dequantize(...) / s``.
    """
    o, k = w.shape
    if gram.shape != (k, k) or x_mean.shape != (k,):
        raise ValueError(f"a weight of shape {(o, k)} needs a ({k}, {k}) Gram matrix and ({k},)")
    if scheme.group_size is not None:
        P.check_group_size(scheme.group_size)
    w = w.detach().float()  # (O, K)
    gram = gram.float()
    s = search_alpha(w, gram, x_mean, scheme, n_grid)  # (K,)
    ws = w * s  # (O, K)
    codes, scale, zero = quantize_clipped(ws, scheme)
    if clip:
        scaled_gram = gram / (s[:, None] * s[None, :])  # (K, K): inputs x / s
        ratio = search_clip(ws, scaled_gram, scheme, n_grid)
        clipped = quantize_clipped(ws, scheme, ratio)
        # the per-cell choice ignores cross-cell terms: keep it only if the whole improves
        gs = scheme.group_size
        if output_error(ws - P.dequantize(*clipped, gs), scaled_gram) < output_error(
            ws - P.dequantize(codes, scale, zero, gs), scaled_gram
        ):
            codes, scale, zero = clipped
    return codes, scale, None if scheme.symmetric else zero, s


# -- config and handler --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AWQConfig(WeightQuantConfig):
    """AWQ weight-only quantization from calibration data (see the module docstring)."""

    method = "awq"

    n_grid: int = 20
    clip: bool = True
    max_rows: int = 4096

    def validate(self) -> None:
        super().validate()
        if self.n_grid < 1:
            self.fail("n_grid", "a positive integer")
        if self.max_rows < 1:
            self.fail("max_rows", "a positive integer")


def uses_awq(module: nn.Module) -> bool:
    """Linear layers and ungrouped convolutions get AWQ; the rest round to nearest."""
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)


@dataclasses.dataclass
class _Stats:
    abs_sum: torch.Tensor  # (C,) sum of |x| per input channel
    count: int  # rows summed
    samples: list[torch.Tensor]  # sampled input rows, each (m, K)


class Activations:
    """Mean ``|x|`` per input channel and a row sample of each watched layer's inputs."""

    def __init__(self, modules: dict[str, nn.Module], per_batch: int) -> None:
        self.modules = modules
        self.per_batch = per_batch
        self.stats: dict[str, _Stats] = {}
        self._memo = PerInput()
        self._gen = torch.Generator().manual_seed(SAMPLE_SEED)

    def watch(self, name: str, x: torch.Tensor) -> None:
        module = self.modules[name]

        def collect() -> tuple[torch.Tensor, int, torch.Tensor]:
            channels = channel_rows(x, module).float()  # (N, C)
            patches = input_rows(module, x)  # (M, K)
            keep = torch.randperm(patches.shape[0], generator=self._gen)[: self.per_batch]
            return channels.abs().sum(dim=0), channels.shape[0], patches[keep].clone()

        abs_sum, count, sample = self._memo.get(x, geometry(module), collect)
        if name not in self.stats:
            self.stats[name] = _Stats(abs_sum, count, [sample])
            return
        st = self.stats[name]
        st.abs_sum, st.count = st.abs_sum + abs_sum, st.count + count
        st.samples.append(sample)

    def pop(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean |x| per weight column (K,), Gram matrix (K, K) of the sampled rows)."""
        self._memo.clear()
        st = self.stats.pop(name, None)
        if st is None or st.count == 0:
            return None
        module = self.modules[name]
        x_mean = st.abs_sum / st.count  # (C,)
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            x_mean = x_mean.repeat_interleave(kh * kw)  # (C * kh * kw,)
        sample = torch.cat(st.samples)  # (M, K)
        return x_mean, sample.T @ sample


@register(AWQConfig, types=(nn.Linear, nn.Conv2d, nn.Embedding))
def apply_awq(model: nn.Module, config: AWQConfig, ctx: Context) -> nn.Module:
    data = ctx.need_data("awq")
    config.check(model, ctx.names)
    quantize_sequential(model, ctx.names, data, lambda g: _awq_group(g, config, ctx), ctx.report)
    return model


def _awq_group(group: Group, config: AWQConfig, ctx: Context) -> None:
    """Collect the statistics of the group's layers in one run, then quantize and swap."""
    modules = {n: group.root.get_submodule(n) for n in group.names}
    watched = [n for n, m in modules.items() if uses_awq(m)]
    per_batch = -(-config.max_rows // max(1, group.n_batches))
    stats = Activations({n: modules[n] for n in watched}, per_batch)
    if watched:
        with group.watching(stats.watch, watched):
            group.run()
    quant = config.quant_kwargs()

    def make(name: str, module: nn.Module) -> nn.Module:
        weight: Any = module.weight
        found = stats.pop(name) if name in watched else None
        if found is None:
            if name in watched:
                where = group.full_name(name)
                ctx.report(f"awq: {where} saw no calibration input; rounded to nearest")
            q = empty_twin(module, **quant)
            q.set_weight(weight)
            return q
        x_mean, gram = found
        codes, scale, zero, s = awq_quantize(
            weight.detach().reshape(weight.shape[0], -1),
            gram,
            x_mean,
            config.scheme(),
            config.n_grid,
            config.clip,
        )
        q = empty_twin(module, **quant, input_scaling=True)
        q.set_quantized(codes.reshape(weight.shape), scale, zero)
        channel_s = s[:: weight[0, 0].numel()] if weight.dim() == 4 else s  # (C_in,)
        q.set_in_scale(1.0 / channel_s)
        return q

    swap_modules(group.root, group.names, make)
