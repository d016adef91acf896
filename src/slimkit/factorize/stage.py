"""The ``factorize`` stage: layers replaced by products of physically smaller layers.

Methods (each a config + handler):

- ``svd`` (Linear): W (out, in) ≈ B A, the rank-r truncated SVD with sqrt(σ) in both
  factors, as ``LowRankLinear``: Linear in -> r (no bias), Linear r -> out (the bias).
- ``tucker`` (Conv2d): Tucker-2 on the channel modes (HOSVD, then ``iters`` HOOI sweeps)
  as ``TuckerConv2d``: 1x1 conv Cin -> r_in, the kxk core conv r_in -> r_out (the layer's
  stride, padding and dilation), 1x1 conv r_out -> Cout (the bias).
- ``spatial-svd`` (Conv2d, kh, kw > 1): Jaderberg's scheme 2 as ``SpatialConv2d``: a kh x 1
  conv Cin -> r (vertical stride, padding, dilation) then a 1 x kw conv r -> Cout
  (horizontal ones, the bias), from the SVD of the weight as a (Cin kh, Cout kw) matrix.

Ranks come from ``energy`` (the smallest rank keeping that fraction of the squared singular
values, per mode for Tucker), ``ratio`` (a weight budget: that fraction of the layer's
weights) or, for ``svd``, an explicit ``rank``. ``svd`` with ``ratio`` and
``allocate: sensitivity`` spreads the total budget of the selected layers instead: see
:func:`slimkit.factorize.lowrank.allocate_ranks`, with gains measured on calibration data.

A layer whose factors would hold at least as many weights as it does, a grouped conv, or a
conv with string padding or a non-zero padding mode is left as it is and reported through
``ctx.report``. Every layer is planned (and every option checked against it) before any
changes. The new layers hold standard ``nn.Linear`` / ``nn.Conv2d`` children, so
parameters, MACs and size fall; nothing is simulated. Latency falls only where the smaller
layers run faster than the one they replace: two or three convolutions over narrow channels
can be slower than one (measured on digits-resnet's convs at ratio 0.5 on 2 CPU threads).
With ``min_speedup`` every planned layer is timed against the original on its own input,
and only those at least that many times faster are swapped in; the others are reported.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from slimkit.calib.capture import channel_rows, run_batches, watching
from slimkit.compressed import ComposedModule, ConvGeometry, compressed_module, conv_args
from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.errors import ConfigError
from slimkit.factorize import lowrank
from slimkit.registry import register
from slimkit.select import swap_modules


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(
        t.detach().to(device=like.device, dtype=like.dtype).contiguous().clone(),
        requires_grad=like.requires_grad,
    )


F = TypeVar("F", bound=ComposedModule)


def _filled(
    new: F, m: nn.Linear | nn.Conv2d, factors: Sequence[tuple[nn.Module, torch.Tensor]],
    biased: nn.Module,
) -> F:  # fmt: skip
    """``new`` with each child's weight set to its factor (``m``'s dtype, device and
    requires_grad) and ``m``'s bias on the ``biased`` child, in ``m``'s training mode."""
    for child, factor in factors:
        child.weight = _param(factor, m.weight)
    if m.bias is not None:
        biased.bias = _param(m.bias, m.bias)
    return new.train(m.training)


def _pct(new: int, old: int) -> str:
    return f"{100.0 * new / max(old, 1):.0f}% of the dense weights"


# -- layers ----------------------------------------------------------------------------------
@compressed_module
class LowRankLinear(ComposedModule):
    """``second(first(x))``: Linear in -> rank (no bias), Linear rank -> out (the bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_linear(cls, m: nn.Linear, rank: int) -> LowRankLinear:
        b, a = lowrank.truncate(m.weight, rank)  # (out, r), (r, in)
        new = cls(m.in_features, m.out_features, rank, bias=m.bias is not None)
        return _filled(new, m, [(new.first, a), (new.second, b)], new.second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))  # type: ignore[no-any-return]

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.second.bias is not None,
        }

    def dense_weight(self) -> torch.Tensor:
        return self.second.weight @ self.first.weight

    def describe(self) -> str:
        held = self.rank * (self.in_features + self.out_features)
        return (
            f"low-rank Linear {self.in_features} -> {self.rank} -> {self.out_features} "
            f"(rank {self.rank}, {_pct(held, self.in_features * self.out_features)})"
        )


def _geometry(m: nn.Conv2d) -> dict[str, Any]:
    """``m``'s shape arguments without ``groups`` (only groups-1 convolutions factorize)."""
    args = conv_args(m)
    del args["groups"]
    return args


class _FactorizedConv(ComposedModule, ConvGeometry):
    """Shape arguments of the original conv (groups 1, zero padding), kept for the spec; the
    children are standard convolutions."""

    def _conv_spec(self) -> dict[str, Any]:
        return self.geometry_spec(with_groups=False)

    def dense_params(self) -> int:
        kh, kw = self.kernel_size
        return self.in_channels * self.out_channels * kh * kw


@compressed_module
class TuckerConv2d(_FactorizedConv):
    """Tucker-2 conv: ``project_out(core(project_in(x)))``: 1x1 Cin -> rank_in, the kxk
    core rank_in -> rank_out (the original stride, padding, dilation), 1x1 rank_out -> Cout
    (the bias)."""

    def _init_layer(self, rank_in: int, rank_out: int, bias: bool = True) -> None:
        in_channels, out_channels = self.in_channels, self.out_channels
        self.rank_in, self.rank_out = rank_in, rank_out
        self.project_in = nn.Conv2d(in_channels, rank_in, 1, bias=False)
        self.core = nn.Conv2d(
            rank_in, rank_out, self.kernel_size, self.stride, self.padding, self.dilation,
            bias=False,
        )  # fmt: skip
        self.project_out = nn.Conv2d(rank_out, out_channels, 1, bias=bias)

    @classmethod
    def from_conv(cls, m: nn.Conv2d, rank_in: int, rank_out: int, iters: int) -> TuckerConv2d:
        u_out, core, u_in = lowrank.tucker2(m.weight, rank_out, rank_in, iters)
        new = cls(**_geometry(m), rank_in=rank_in, rank_out=rank_out, bias=m.bias is not None)
        factors = [
            (new.project_in, u_in.T[:, :, None, None]),
            (new.core, core),
            (new.project_out, u_out[:, :, None, None]),
        ]
        return _filled(new, m, factors, new.project_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.core(self.project_in(x)))  # type: ignore[no-any-return]

    def spec(self) -> dict[str, Any]:
        return {
            **self._conv_spec(),
            "rank_in": self.rank_in,
            "rank_out": self.rank_out,
            "bias": self.project_out.bias is not None,
        }

    def dense_weight(self) -> torch.Tensor:
        return lowrank.tucker2_weight(
            self.project_out.weight[:, :, 0, 0],
            self.core.weight,
            self.project_in.weight[:, :, 0, 0].T,
        )

    def describe(self) -> str:
        kh, kw = self.kernel_size
        held = lowrank.tucker_params(
            self.in_channels, self.out_channels, kh * kw, self.rank_in, self.rank_out
        )
        return (
            f"Tucker-2 conv {self.in_channels} -> {self.rank_in} -> {kh}x{kw} -> "
            f"{self.rank_out} -> {self.out_channels} (ranks in {self.rank_in}, out "
            f"{self.rank_out}, {_pct(held, self.dense_params())})"
        )


@compressed_module
class SpatialConv2d(_FactorizedConv):
    """Spatially separated conv: ``horizontal(vertical(x))``: kh x 1 Cin -> rank (vertical
    stride, padding, dilation), 1 x kw rank -> Cout (horizontal ones, the bias)."""

    def _init_layer(self, rank: int, bias: bool = True) -> None:
        in_channels, out_channels = self.in_channels, self.out_channels
        self.rank = rank
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        self.vertical = nn.Conv2d(in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
        self.horizontal = nn.Conv2d(
            rank, out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias
        )

    @classmethod
    def from_conv(cls, m: nn.Conv2d, rank: int) -> SpatialConv2d:
        vertical, horizontal = lowrank.spatial_svd(m.weight, rank)
        new = cls(**_geometry(m), rank=rank, bias=m.bias is not None)
        factors = [(new.vertical, vertical), (new.horizontal, horizontal)]
        return _filled(new, m, factors, new.horizontal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizontal(self.vertical(x))  # type: ignore[no-any-return]

    def spec(self) -> dict[str, Any]:
        return {**self._conv_spec(), "rank": self.rank, "bias": self.horizontal.bias is not None}

    def dense_weight(self) -> torch.Tensor:
        return lowrank.spatial_weight(self.vertical.weight, self.horizontal.weight)

    def describe(self) -> str:
        kh, kw = self.kernel_size
        held = self.rank * (self.in_channels * kh + self.out_channels * kw)
        return (
            f"spatial SVD conv {kh}x1 {self.in_channels} -> {self.rank}, 1x{kw} -> "
            f"{self.out_channels} (rank {self.rank}, {_pct(held, self.dense_params())})"
        )


# -- configs ---------------------------------------------------------------------------------
class Allocate(str, enum.Enum):
    UNIFORM, SENSITIVITY = "uniform", "sensitivity"


@dataclasses.dataclass(frozen=True)
class FactorizeConfig(StageConfig):
    """Rank rule shared by the methods: exactly one of ``energy`` (in (0, 1]: keep the
    smallest rank holding that fraction of the squared singular values) or ``ratio`` (in
    (0, 1): a weight budget, that fraction of the layer's weights). Neither: ratio 0.5.
    ``min_speedup``: keep a factorized layer only where it measures at least that many times
    faster than the layer it replaces, on that layer's own input from the task's latency
    batch (or the first calibration batch), on this machine (null: no timing)."""

    kind = "factorize"

    energy: float | None = None
    ratio: float | None = None
    min_speedup: float | None = None

    def rules(self) -> list[str]:
        return ["energy", "ratio"]

    def validate(self) -> None:
        super().validate()
        given = [name for name in self.rules() if getattr(self, name) is not None]
        if len(given) > 1:
            self.fail(given[1], f"exactly one of {', '.join(self.rules())} (also got {given[0]})")
        if not given:
            object.__setattr__(self, "ratio", 0.5)
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            self.fail("energy", "a fraction in (0, 1] of the squared singular values kept")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            self.fail("ratio", "a fraction in (0, 1) of the layer's weights kept")
        if self.min_speedup is not None and not (
            math.isfinite(self.min_speedup) and self.min_speedup > 0
        ):
            self.fail("min_speedup", "a number > 0 (times faster), or null for no timing")


@dataclasses.dataclass(frozen=True)
class SVDConfig(FactorizeConfig):
    """Truncated SVD of Linear layers. ``rank``: one explicit rank for every selected layer
    (at most min(in, out) of each). ``allocate: sensitivity`` (with ``ratio`` only) spreads
    the selected layers' total weight budget by output error removed per weight, measured
    on calibration data; ``uniform`` gives every layer the same ratio."""

    method = "svd"

    rank: int | None = None
    allocate: Allocate = Allocate.UNIFORM

    def rules(self) -> list[str]:
        return ["energy", "ratio", "rank"]

    def validate(self) -> None:
        super().validate()
        if self.rank is not None and self.rank < 1:
            self.fail("rank", "an integer >= 1")
        if self.allocate is Allocate.SENSITIVITY and self.ratio is None:
            self.fail("allocate", "uniform, or sensitivity together with ratio")

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        """ConfigError for an explicit ``rank`` above a selected layer's min(in, out)."""
        if self.rank is None:
            return
        for name, m in _unique(model, names).items():
            top = min(m.in_features, m.out_features) if isinstance(m, nn.Linear) else None
            if top is not None and self.rank > top:
                raise ConfigError(
                    f"{self._where('rank')}: got {self.rank}; layer {name!r} "
                    f"({m.in_features} -> {m.out_features}) allows at most rank {top}"
                )


@dataclasses.dataclass(frozen=True)
class TuckerConfig(FactorizeConfig):
    """Tucker-2 of Conv2d layers on the channel modes: HOSVD then ``iters`` HOOI sweeps.
    ``energy`` applies to each mode; ``ratio`` picks r_in / Cin ≈ r_out / Cout, the largest
    pair within the budget."""

    method = "tucker"

    iters: int = 5

    def validate(self) -> None:
        super().validate()
        if self.iters < 0:
            self.fail("iters", "an integer >= 0 (HOOI sweeps after the HOSVD)")


@dataclasses.dataclass(frozen=True)
class SpatialSVDConfig(FactorizeConfig):
    """Spatial SVD of kxk Conv2d layers (k > 1) into kx1 and 1xk convs."""

    method = "spatial-svd"


# -- planning --------------------------------------------------------------------------------
Make = Callable[[], nn.Module]


def _unique(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The first name of each distinct selected module."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name in names:
        m = model.get_submodule(name)
        if id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


def _swap(
    model: nn.Module, names: list[str], plans: dict[int, Make], config: FactorizeConfig,
    ctx: Context,
) -> None:  # fmt: skip
    chosen = [n for n in names if id(model.get_submodule(n)) in plans]
    if config.min_speedup is not None and chosen:
        built = _measured(model, _unique(model, chosen), plans, config, ctx)
        chosen = [n for n in chosen if id(model.get_submodule(n)) in built]
        swap_modules(model, chosen, lambda _name, m: built[id(m)])
        return
    swap_modules(model, chosen, lambda _name, m: plans[id(m)]())


TIMING_RUNS, TIMING_WARMUP = 10, 2


def _measured(
    model: nn.Module, layers: dict[str, nn.Module], plans: dict[int, Make],
    config: FactorizeConfig, ctx: Context,
) -> dict[int, nn.Module]:  # fmt: skip
    """The factorized layers that time at least ``min_speedup`` times faster than the layer
    they replace on its own input (median of warm runs, alternating); the others reported."""
    from slimkit.evaluate.latency import time_alternating

    if ctx.task is not None:
        batch = ctx.task.latency_inputs()
    else:
        batch = ctx.need_data(f"factorize {config.method} with min_speedup")[0]
    inputs: dict[str, torch.Tensor] = {}

    def first(name: str, x: torch.Tensor) -> None:
        inputs.setdefault(name, x)

    with watching(model, list(layers), first):
        run_batches(model, [batch])
    kept: dict[int, nn.Module] = {}
    for name, m in layers.items():
        new = plans[id(m)]().eval()
        if name not in inputs:
            _skip(ctx, config.method, name, "min_speedup: the latency batch never reaches it")
            continue
        before, after = time_alternating([m, new], inputs[name], TIMING_RUNS, TIMING_WARMUP)
        speedup = before["median"] / after["median"]
        timing = f"{after['median']:.3f} ms vs {before['median']:.3f} ms ({speedup:.2f}x)"
        if speedup >= config.min_speedup:
            kept[id(m)] = new.train(m.training)
            ctx.report(f"factorize {config.method}: {name}: {timing}")
        else:
            _skip(ctx, config.method, name, f"{timing}, under min_speedup {config.min_speedup}")
    return kept


def _skip(ctx: Context, method: str, name: str, why: str) -> None:
    ctx.report(f"factorize {method}: {name}: {why}; left as it is")


def _rank_fits(ctx: Context, method: str, name: str, r: int, rows: int, cols: int) -> bool:
    """Whether rank ``r`` factors of a ``rows`` x ``cols`` matrix shrink it; a line in the
    report when they do not (no rank left, or at least as many weights)."""
    if r < 1:
        _skip(ctx, method, name, f"the budget leaves no rank ({cols} -> {rows})")
        return False
    if not lowrank.shrinks(r, rows, cols):
        _skip(ctx, method, name, f"rank {r} would not shrink it "
              f"({r * (rows + cols)} >= {rows * cols} weights)")  # fmt: skip
        return False
    return True


def _conv_problem(m: nn.Conv2d) -> str | None:
    if m.groups != 1:
        return f"grouped conv (groups={m.groups}) is not factorized"
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        return f"padding {m.padding!r} / padding_mode {m.padding_mode!r} is not supported"
    return None


def _linear_ranks(
    model: nn.Module, layers: dict[str, nn.Linear], config: SVDConfig, ctx: Context
) -> dict[str, int]:
    """Each layer's rank (before the shrink check); ConfigError for a rank a layer cannot
    take, before anything changes."""
    if config.rank is not None:
        config.check(model, list(layers))
        return dict.fromkeys(layers, config.rank)
    if config.energy is not None:
        return {
            name: lowrank.energy_rank(
                torch.linalg.svdvals(m.weight.detach().double()), config.energy
            )
            for name, m in layers.items()
        }
    assert config.ratio is not None
    if config.allocate is Allocate.SENSITIVITY:
        return _sensitivity_ranks(model, layers, config.ratio, ctx)
    return {
        name: lowrank.ratio_rank(m.out_features, m.in_features, config.ratio)
        for name, m in layers.items()
    }


def input_moments(
    model: nn.Module, layers: dict[str, nn.Linear], ctx: Context
) -> dict[str, torch.Tensor]:
    """X^T X (in, in), float64, of the rows entering each layer over the calibration data."""
    data = ctx.need_data("factorize svd with allocate: sensitivity")
    moments: dict[str, torch.Tensor] = {}

    def watch(name: str, x: torch.Tensor) -> None:
        r = channel_rows(x, layers[name]).double()
        m = r.T @ r
        moments[name] = moments[name] + m if name in moments else m

    with watching(model, list(layers), watch):
        run_batches(model, data)
    return moments


def _sensitivity_ranks(
    model: nn.Module, layers: dict[str, nn.Linear], ratio: float, ctx: Context
) -> dict[str, int]:
    moments = input_moments(model, layers, ctx)
    gains, costs, caps = [], [], []
    for name, m in layers.items():
        _, s, vh = lowrank.svd(m.weight)
        cov = moments.get(name)
        if cov is None:  # never reached by the data: plain singular values
            cov = torch.eye(m.in_features, dtype=torch.float64, device=s.device)
        gains.append(lowrank.output_gains(s, vh, cov.to(s.device)))
        costs.append(m.in_features + m.out_features)
        caps.append(lowrank.max_shrinking_rank(m.in_features, m.out_features))
    budget = ratio * sum(m.in_features * m.out_features for m in layers.values())
    ranks = lowrank.allocate_ranks(gains, costs, caps, budget)
    return dict(zip(layers, ranks, strict=True))


# -- handlers ----------------------------------------------------------------------------------
@register(SVDConfig, types=(nn.Linear,))
def apply_svd(model: nn.Module, config: SVDConfig, ctx: Context) -> nn.Module:
    layers = {n: m for n, m in _unique(model, ctx.names).items() if isinstance(m, nn.Linear)}
    ranks = _linear_ranks(model, layers, config, ctx)
    plans: dict[int, Make] = {}
    for name, m in layers.items():
        if _rank_fits(ctx, "svd", name, ranks[name], m.out_features, m.in_features):
            plans[id(m)] = functools.partial(LowRankLinear.from_linear, m, ranks[name])
    _swap(model, ctx.names, plans, config, ctx)
    return model


def _conv_layers(model: nn.Module, ctx: Context, method: str) -> dict[str, nn.Conv2d]:
    out: dict[str, nn.Conv2d] = {}
    for name, m in _unique(model, ctx.names).items():
        assert isinstance(m, nn.Conv2d)
        problem = _conv_problem(m)
        if problem:
            _skip(ctx, method, name, problem)
        else:
            out[name] = m
    return out


@register(TuckerConfig, types=(nn.Conv2d,))
def apply_tucker(model: nn.Module, config: TuckerConfig, ctx: Context) -> nn.Module:
    plans: dict[int, Make] = {}
    for name, m in _conv_layers(model, ctx, "tucker").items():
        c_in, c_out = m.in_channels, m.out_channels
        k = math.prod(m.kernel_size)
        ranks: tuple[int, int] | None
        if config.energy is not None:
            ranks = lowrank.tucker_core_ranks(
                lowrank.energy_rank(lowrank.mode_singular_values(m.weight, 1), config.energy),
                lowrank.energy_rank(lowrank.mode_singular_values(m.weight, 0), config.energy),
                k,
            )
        else:
            assert config.ratio is not None
            ranks = lowrank.tucker_ratio_ranks(c_in, c_out, k, config.ratio)
        if ranks is None:
            _skip(ctx, "tucker", name, "the budget leaves no ranks")
            continue
        held = lowrank.tucker_params(c_in, c_out, k, *ranks)
        if held >= c_in * c_out * k:
            _skip(ctx, "tucker", name, f"ranks (in {ranks[0]}, out {ranks[1]}) would not "
                  f"shrink it ({held} >= {c_in * c_out * k} weights)")  # fmt: skip
            continue
        plans[id(m)] = functools.partial(TuckerConv2d.from_conv, m, *ranks, config.iters)
    _swap(model, ctx.names, plans, config, ctx)
    return model


@register(SpatialSVDConfig, types=(nn.Conv2d,))
def apply_spatial_svd(model: nn.Module, config: SpatialSVDConfig, ctx: Context) -> nn.Module:
    plans: dict[int, Make] = {}
    for name, m in _conv_layers(model, ctx, "spatial-svd").items():
        kh, kw = m.kernel_size
        if kh < 2 or kw < 2:
            _skip(ctx, "spatial-svd", name, f"a {kh}x{kw} kernel has no kxk (k > 1) to split")
            continue
        rows_, cols = m.in_channels * kh, m.out_channels * kw
        if config.energy is not None:
            s = torch.linalg.svdvals(lowrank.spatial_matrix(m.weight.detach().double()))
            r = lowrank.energy_rank(s, config.energy)
        else:
            assert config.ratio is not None
            r = lowrank.ratio_rank(cols, rows_, config.ratio)
        if _rank_fits(ctx, "spatial-svd", name, r, rows_, cols):
            plans[id(m)] = functools.partial(SpatialConv2d.from_conv, m, r)
    _swap(model, ctx.names, plans, config, ctx)
    return model


__all__ = [
    "Allocate",
    "LowRankLinear",
    "SVDConfig",
    "SpatialConv2d",
    "SpatialSVDConfig",
    "TuckerConfig",
    "TuckerConv2d",
]
