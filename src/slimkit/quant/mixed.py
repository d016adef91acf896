"""Mixed-precision weight quantization: one bit width per layer within an average-bits budget.

Three steps:

1. Sensitivity. One pass over the calibration data collects each layer's input second moment
   ``H = X^T X / n``; the proxy of quantizing layer ``l`` at ``b`` bits is the expected output
   distortion ``tr(E H E^T)`` with ``E = W - Q_b(W)`` (round to nearest at the stage's
   granularity). Layers without a useful ``H`` (embeddings, grouped convolutions) use
   ``||E||^2``. Proxies of different layers are made comparable end to end: the layer alone is
   quantized at the probe width, the change of the model's output (mean squared error of its
   first output tensor on a few calibration batches) is measured, and the layer's proxies are
   scaled so that the one at the probe width equals that change.
2. Allocation (:func:`allocate`). The widths minimizing the summed sensitivity subject to
   ``sum(n_l * b_l) <= avg_bits * sum(n_l)``, ``n_l`` the weight count: a multiple-choice
   knapsack solved exactly by dynamic programming over the extra bits.
3. Quantization. The chosen quantizer (``rtn`` or ``gptq``) runs through the registry once per
   distinct width, on the layers given that width; each layer's spec records its ``bits``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit import registry
from slimkit.calib.capture import check_finite_input
from slimkit.calib.sequential import (
    PerInput,
    check_rows,
    columns,
    geometry,
    input_rows,
    token_mask,
)
from slimkit.config import Config
from slimkit.context import Context, StageResult, model_of
from slimkit.data import Batch, call, first_tensor
from slimkit.errors import ConfigError, ModelError
from slimkit.formats.primitives import fake_quantize
from slimkit.model_info import eval_mode
from slimkit.quant.common import MAX_BITS, MIN_BITS, WEIGHT_SWAPS, WeightQuantConfig
from slimkit.registry import register

QUANTIZERS = ("rtn", "gptq")
#: largest knapsack capacity, in size units, the allocation solves exactly (see ``allocate``)
MAX_UNITS = 1 << 16


@dataclasses.dataclass(frozen=True)
class MixedConfig(WeightQuantConfig):
    """Per-layer bit widths from ``candidates``, parameter-weighted mean at most ``avg_bits``.

    ``bits`` is not used (leave it unset): each layer's width comes from the allocation.
    ``probe_batches`` calibration batches measure the end-to-end weighting, at ``probe_bits``
    (the smallest candidate when null). ``damp``, ``act_order`` and ``strict`` go to the gptq
    quantizer; with ``strict`` and gptq, a layer whose inputs give fewer calibration rows than
    it has input columns is a DataError before any layer changes.
    """

    method = "mixed"

    avg_bits: float = 4.5
    candidates: tuple[int, ...] = (3, 4, 5, 6, 8)
    quantizer: str = "gptq"
    probe_batches: int = 1
    probe_bits: int | None = None
    damp: float = 0.01
    act_order: bool = False
    strict: bool = False

    def validate(self) -> None:
        super().validate()
        if self.bits != 8:
            self.fail("bits", "unset (8): mixed chooses each layer's width from candidates")
        widths = f"distinct widths in {MIN_BITS}..{MAX_BITS}"
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            self.fail("candidates", f"a non-empty list of {widths}")
        if any(not MIN_BITS <= b <= MAX_BITS for b in self.candidates):
            self.fail("candidates", widths)
        lo, hi = min(self.candidates), max(self.candidates)
        if not lo <= self.avg_bits <= hi:
            self.fail("avg_bits", f"{lo}..{hi} (the smallest to the largest candidate)")
        if self.quantizer not in QUANTIZERS:
            self.fail("quantizer", ", ".join(QUANTIZERS))
        if self.probe_batches < 1:
            self.fail("probe_batches", "an integer >= 1")
        if self.probe_bits is not None and not MIN_BITS <= self.probe_bits <= MAX_BITS:
            self.fail("probe_bits", f"{MIN_BITS}..{MAX_BITS} or null")
        if not 0.0 < self.damp <= 1.0:
            self.fail("damp", "a number in (0, 1]")

    @property
    def widths(self) -> tuple[int, ...]:
        """The candidate widths, ascending."""
        return tuple(sorted(self.candidates))

    def probe_width(self) -> int:
        return self.widths[0] if self.probe_bits is None else self.probe_bits


# -- sensitivity (pure) ------------------------------------------------------------------------
def proxy_error(w: torch.Tensor, h: torch.Tensor | None, bits: int, quant: dict[str, Any]) -> float:
    """Expected output distortion ``tr(E H E^T)`` of round-to-nearest ``bits``-bit ``w``.

    ``w`` is (C, ...) viewed as (C, K); ``h`` is (K, K), or None for ``||E||^2`` (H = I).
    ``quant`` holds ``symmetric``, ``per_channel`` and ``group_size``.
    """
    err = w.detach().float() - fake_quantize(w.detach().float(), bits, **quant)
    err = err.reshape(err.shape[0], -1)  # (C, K)
    if h is None:
        return float((err * err).sum())
    return float(((err @ h) * err).sum())  # sum_c e_c H e_c^T


def weighted_costs(proxies: np.ndarray, probe_mse: np.ndarray, probe_col: int) -> np.ndarray:
    """Proxies (L, B) scaled per layer so column ``probe_col`` equals the measured change of the
    model's output (L,): comparable across layers. A layer with a zero proxy costs nothing."""
    at_probe = proxies[:, probe_col]  # (L,)
    safe = np.where(at_probe > 0, at_probe, 1.0)
    alpha = np.where(at_probe > 0, probe_mse / safe, 0.0)  # (L,)
    return proxies * alpha[:, None]  # (L, B)


# -- allocation (pure) -------------------------------------------------------------------------
def allocate(
    costs: Sequence[Sequence[float]] | np.ndarray,
    sizes: Sequence[int],
    widths: Sequence[int],
    avg_bits: float,
    max_units: int = MAX_UNITS,
) -> list[int]:
    """The width (from ``widths``) of each layer minimizing ``sum(costs[l][j])`` subject to
    ``sum(sizes[l] * width_l) <= avg_bits * sum(sizes)``.

    ``costs`` is (L, B) with column ``j`` the cost at ``widths[j]``. Dynamic programming over
    the extra bits above the smallest width, counted in units of the gcd of the extras: exact
    when the total fits ``max_units`` units; otherwise each layer's extra is rounded up to a
    coarser unit, which keeps the budget and may leave a sliver of it unused.
    """
    cost = np.asarray(costs, dtype=np.float64).reshape(len(sizes), len(widths))  # (L, B)
    order = sorted(range(len(widths)), key=lambda j: widths[j])
    ws = [int(widths[j]) for j in order]
    cost = cost[:, order]
    total = sum(int(n) for n in sizes)
    if not ws[0] <= avg_bits <= ws[-1]:
        raise ValueError(f"avg_bits {avg_bits} outside {ws[0]}..{ws[-1]}")
    if not sizes:
        return []
    extra = [[int(n) * (b - ws[0]) for b in ws] for n in sizes]  # (L, B) exact bits
    capacity = math.floor(Fraction(avg_bits) * total) - ws[0] * total
    unit = _unit(extra, max_units)
    weight = np.array([[-(-e // unit) for e in row] for row in extra], dtype=np.int64)  # (L, B)
    choice = _knapsack(cost, weight, capacity // unit)  # (L,)
    return [ws[j] for j in choice]


def _unit(extra: list[list[int]], max_units: int) -> int:
    """Size unit of the knapsack: the gcd of the extras, coarser when they would need more than
    ``max_units`` units in total."""
    unit = 0
    for row in extra:
        for e in row:
            unit = math.gcd(unit, e)
    unit = max(unit, 1)
    most = sum(row[-1] for row in extra)  # every layer at the widest candidate
    if most > unit * max_units:
        unit = -(-most // max_units)
    return unit


def _knapsack(cost: np.ndarray, weight: np.ndarray, capacity: int) -> list[int]:
    """Column per row of ``cost`` (L, B) minimizing the sum, ``sum(weight) <= capacity``;
    column 0 weighs nothing, so every capacity >= 0 is feasible."""
    n_layers, n_widths = cost.shape
    best = np.zeros(capacity + 1)  # (U+1,) least cost of the layers so far within u units
    picks = np.zeros((n_layers, capacity + 1), dtype=np.int16)  # (L, U+1)
    for layer in range(n_layers):
        new = np.full(capacity + 1, np.inf)
        for j in range(n_widths):
            w = int(weight[layer, j])
            if w > capacity:
                continue
            cand = best[: capacity + 1 - w] + cost[layer, j]  # (U+1-w,)
            better = cand < new[w:]
            new[w:] = np.where(better, cand, new[w:])
            picks[layer, w:] = np.where(better, j, picks[layer, w:])
        best = new
    out, u = [0] * n_layers, capacity
    for layer in reversed(range(n_layers)):
        out[layer] = int(picks[layer, u])
        u -= int(weight[layer, out[layer]])
    return out


# -- measurement ---------------------------------------------------------------------------
def has_hessian(module: nn.Module) -> bool:
    """True where ``H`` of the input rows fits the weight: Linear layers and ungrouped,
    zero-padded convolutions (embeddings take ids, not rows)."""
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def real_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` without padded positions: (N_real, ...) when ``x`` is (B, T, ...) and ``keep``
    (B, T) marks the real tokens; otherwise ``x`` unchanged."""
    if keep is not None and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(keep.shape):
        return x[keep]
    return x


class Moments:
    """Running ``X^T X`` and row count of each watched layer's input, padded tokens left out;
    layers fed the very same tensor (query, key, value) share one product."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.keep: torch.Tensor | None = None  # (B, T) real tokens of the current batch
        self._memo = PerInput()

    def watch(self, name: str, x: torch.Tensor) -> None:
        module = self.layers[name]

        def gram() -> tuple[torch.Tensor, int]:
            check_finite_input(name, x)
            rows = input_rows(module, real_rows(x.detach(), self.keep))  # (N, K)
            return rows.T @ rows, rows.shape[0]  # (K, K)

        xtx, n = self._memo.get(x, geometry(module), gram)
        self.sums[name] = self.sums[name] + xtx if name in self.sums else xtx.clone()
        self.counts[name] = self.counts.get(name, 0) + n

    def hessians(self) -> dict[str, torch.Tensor]:
        """``H = X^T X / n`` (K, K) of each layer that saw input."""
        return {name: s / max(self.counts[name], 1) for name, s in self.sums.items()}

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        def hook_for(name: str) -> Callable[..., None]:
            return lambda _module, args: self.watch(name, args[0])

        handles = [
            model.get_submodule(name).register_forward_pre_hook(hook_for(name))
            for name in self.layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._memo.clear()


def collect_moments(
    model: nn.Module, layers: dict[str, nn.Module], data: Sequence[Batch], n_refs: int
) -> tuple[Moments, list[torch.Tensor]]:
    """One pass over ``data``: the input moments of every layer in ``layers`` that has a
    Hessian, and the model's first output tensor (real tokens only) on the first ``n_refs``
    batches."""
    stats = Moments({n: m for n, m in layers.items() if has_hessian(m)})
    refs = []
    with stats.hooked(model):
        for i, batch in enumerate(data):
            stats.keep = token_mask(batch)
            out = call(model, batch)
            if i < n_refs:
                refs.append(real_rows(_output(out), stats.keep).clone())
    return stats, refs


def second_moments(
    model: nn.Module, layers: dict[str, nn.Module], data: Sequence[Batch], n_refs: int
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One pass over ``data``: ``H`` (K, K) of every layer in ``layers`` that has one, and the
    model's first output tensor (real tokens only) on the first ``n_refs`` batches."""
    stats, refs = collect_moments(model, layers, data, n_refs)
    return stats.hessians(), refs


def _output(out: Any) -> torch.Tensor:
    try:
        return first_tensor(out).detach().float()
    except TypeError as e:
        raise ModelError(f"mixed: {e}") from None


def output_change(model: nn.Module, probe: Sequence[Batch], refs: Sequence[torch.Tensor]) -> float:
    """Mean squared difference of the model's first output tensor (real tokens) from ``refs``."""
    total, count = 0.0, 0
    for batch, ref in zip(probe, refs, strict=True):
        out = real_rows(_output(call(model, batch)), token_mask(batch))
        total += float(((out - ref).double() ** 2).sum())
        count += ref.numel()
    return total / max(count, 1)


@contextlib.contextmanager
def swapped_weight(module: nn.Module, w: torch.Tensor) -> Iterator[None]:
    """While open, ``module.weight`` holds ``w``; the original values come back after."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    saved = weight.detach().clone()
    weight.data.copy_(w)
    try:
        yield
    finally:
        weight.data.copy_(saved)


def sensitivity(
    model: nn.Module,
    layers: dict[str, nn.Module],
    data: Sequence[Batch],
    config: MixedConfig,
    ctx: Context,
) -> np.ndarray:
    """Cost (L, B) of each layer of ``layers`` at each width of ``config.widths``."""
    quant = config.quant_kwargs()
    del quant["bits"]
    probe = list(data[: config.probe_batches])
    stats, refs = collect_moments(model, layers, data, len(probe))
    if config.strict and config.quantizer == "gptq":
        for name, rows in stats.counts.items():
            check_rows(name, rows, columns(layers[name]), "GPTQ", strict=True)
    hs = stats.hessians()
    probe_width = config.probe_width()
    widths = sorted({*config.widths, probe_width})
    proxies = np.zeros((len(layers), len(widths)))  # (L, B')
    change = np.zeros(len(layers))  # (L,)
    for i, (name, module) in enumerate(layers.items()):
        w = module.weight.detach()  # type: ignore[union-attr,operator]
        proxies[i] = [proxy_error(w, hs.get(name), b, quant) for b in widths]
        with swapped_weight(module, fake_quantize(w, probe_width, **quant)):
            change[i] = output_change(model, probe, refs)
        ctx.report(f"mixed: {name}: output change {change[i]:.3g} at {probe_width} bits")
    costs = weighted_costs(proxies, change, widths.index(probe_width))
    return costs[:, [widths.index(b) for b in config.widths]]  # (L, B)


# -- handler -----------------------------------------------------------------------------------
def stage_configs(config: MixedConfig, widths: Sequence[int]) -> dict[int, Config]:
    """The quantizer's config at each of ``widths`` (ConfigError when it is not available)."""
    cls = registry.config_class("quantize", config.quantizer)
    if cls is None:
        raise ConfigError(f"quantize.mixed.quantizer: {config.quantizer!r} is not available")
    own = {f.name for f in dataclasses.fields(cls)}
    passed = (
        "granularity",
        "group_size",
        "symmetric",
        "targets",
        "ignore",
        "damp",
        "act_order",
        "strict",
    )
    shared = {name: getattr(config, name) for name in passed if name in own}
    return {b: cls(bits=b, **shared) for b in widths}  # type: ignore[call-arg]


def distinct_layers(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """First name of each distinct selected module -> all its selected names."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name in names:
        key = id(model.get_submodule(name))
        out.setdefault(first.setdefault(key, name), []).append(name)
    return out


@register(MixedConfig, types=tuple(WEIGHT_SWAPS))
def apply_mixed(model: nn.Module, config: MixedConfig, ctx: Context) -> StageResult:
    config.check(model, ctx.names)
    stages = stage_configs(config, config.widths)
    data = ctx.need_data("mixed")
    aliases = distinct_layers(model, ctx.names)
    if not aliases:
        return StageResult(model)
    layers = {name: model.get_submodule(name) for name in aliases}
    ctx.report(f"mixed: measuring the sensitivity of {len(layers)} layers")
    with torch.no_grad(), eval_mode(model):
        costs = sensitivity(model, layers, data, config, ctx)
    sizes = [int(m.weight.numel()) for m in layers.values()]  # type: ignore[union-attr,operator]
    chosen = dict(zip(layers, allocate(costs, sizes, config.widths, config.avg_bits), strict=True))
    mean = sum(n * chosen[name] for name, n in zip(layers, sizes, strict=True)) / sum(sizes)
    ctx.report(f"mixed: {mean:.3f} bits per weight on average (budget {config.avg_bits})")
    for b in sorted(set(chosen.values())):
        subset = [alias for name in layers if chosen[name] == b for alias in aliases[name]]
        ctx.report(f"mixed: {b} bits: {', '.join(subset)}")
        sub = Context(names=subset, data=data, task=ctx.task, progress=ctx.progress)
        model = model_of(registry.handler_for(stages[b])(model, stages[b], sub))
    return StageResult(model, record={"mean_bits": mean, "bits": chosen})
