"""Structured pruning: remove whole channels and rebuild smaller dense standard layers.

``prune/graph.py`` finds the groups of coupled channels. For each group whose layers are all
selected, every channel (class) is scored by the sum over the group's producing layers of
their per-output-channel importance (l1, l2, fpgm or taylor, each layer's scores divided by
their mean), and ``ratio`` of the group's channels with the lowest scores go, keeping at least
``min_channels`` per group and one per layer. Blocked channels (model outputs, unknown ops)
always stay. Even sites (grouped convolutions, ``chunk``) are pruned per conv group: each
loses the same number of channels, or the group stays whole with a warning.

Every coupled layer is then rebuilt with ``index_select`` on the right dims (Conv2d out / in
channels, per conv group; Linear out / in features, including a flatten's repeated columns;
BatchNorm2d / LayerNorm entries and running statistics; biases) and swapped in through its
parent. The result holds only standard layers, which artifacts record and rebuild on load.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.data import Batch
from slimkit.errors import ConfigError
from slimkit.prune.graph import (
    ChannelGraph,
    ChannelGroup,
    Site,
    analyze,
    even_split,
    output_producers,
)
from slimkit.prune.importance import Criterion, Unit, importance
from slimkit.registry import register
from slimkit.select import matches, set_module

STRUCTURED_CRITERIA = (Criterion.L1, Criterion.L2, Criterion.FPGM, Criterion.TAYLOR)
#: kept positions per (module name, site role)
Plan = dict[tuple[str, str], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class StructuredConfig(StageConfig):
    """Remove ``ratio`` of the channels of every group of coupled channels, scored by
    ``criterion``; each group keeps at least ``min_channels``. Only groups whose Conv2d and
    Linear layers are all selected are pruned. A module named by ``ignore`` that is not such
    a layer is traced as a whole (a leaf): the channels it reads are kept, which also lets a
    model with an untraceable submodule be pruned around it."""

    kind = "prune"
    method = "structured"

    ratio: float = 0.5
    criterion: Criterion = Criterion.L1
    min_channels: int = 1

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.ratio < 1.0:
            self.fail("ratio", "a fraction in [0, 1) of the channels removed per group")
        if self.criterion not in STRUCTURED_CRITERIA:
            self.fail("criterion", ", ".join(c.value for c in STRUCTURED_CRITERIA))
        if self.min_channels < 1:
            self.fail("min_channels", "an integer >= 1")


# -- selection ---------------------------------------------------------------------------
def class_scores(group: ChannelGroup, scores: dict[str, torch.Tensor]) -> dict[int, float]:
    """Per class, the sum over the group's producers of their mean-normalised scores."""
    total = dict.fromkeys(group.classes, 0.0)
    for s in group.sites:
        if s.role == "out" and s.module in scores:
            v = scores[s.module].detach().double()
            v = v / v.mean() if float(v.mean()) > 0 else v
            for i, r in enumerate(s.roots):
                total[r] += float(v[i])
    return total


def _lowest(classes: list[int], score: dict[int, float], k: int) -> list[int]:
    """The ``k`` lowest-scoring of ``classes`` (ties: earlier classes go first)."""
    order = sorted(range(len(classes)), key=lambda i: (score[classes[i]], i))
    return [classes[i] for i in order[: max(k, 0)]]


def removed_classes(
    group: ChannelGroup, score: dict[int, float], config: StructuredConfig
) -> tuple[set[int], str | None]:
    """The classes to remove, and a warning when the group must stay whole.

    The ratio applies within each bucket of classes that share their conv group in every
    grouped site and their producers: the parts of a concatenation are pruned alike (each
    branch keeps the same share), the channels of a residual sum all together."""
    even = [s for s in group.sites if s.groups > 1]
    producers = [s for s in group.sites if s.role == "out"]
    buckets: dict[tuple[int, ...], list[int]] = {}
    for r in group.classes:  # a class's conv group in each even site, and who produces it
        key = tuple(_group_of(s, r) for s in even)
        key += tuple(i for i, s in enumerate(producers) if r in s.roots)
        buckets.setdefault(key, []).append(r)
    floor = max(1, math.ceil(config.min_channels / len(buckets)))
    removed: set[int] = set()
    for members in buckets.values():
        free = [r for r in members if r not in group.blocked]
        k = min(round(config.ratio * len(members)), len(free), len(members) - floor)
        removed.update(_lowest(free, score, k))
    for s in group.sites:  # every layer keeps one channel
        if s.roots and all(r in removed for r in s.roots):
            removed.discard(max(s.roots, key=lambda r: score[r]))
    for s in even:
        kept = [i for i, r in enumerate(s.roots) if r not in removed]
        if removed and not even_split(s, kept):
            where = s.module or "a chunk along channels"
            return set(), f"{where}: its {s.groups} channel groups cannot be pruned evenly; kept"
    return removed, None


def _group_of(site: Site, root: int) -> int:
    """The conv group of ``site`` holding ``root``; negative when ``site`` holds it in no
    group (-1) or in several."""
    per = len(site.roots) // site.groups
    found = {i // per for i, r in enumerate(site.roots) if r == root}
    return found.pop() if len(found) == 1 else -1 - len(found)


def prunable(group: ChannelGroup, selected: set[str]) -> bool:
    """Whether the group has a free class and every Conv2d/Linear holding it is selected."""
    layers = [s.module for s in group.sites if s.role in ("out", "in", "depthwise")]
    free = any(r not in group.blocked for r in group.classes)
    return free and all(m in selected for m in layers)


def plan_group(group: ChannelGroup, removed: set[int]) -> Plan:
    plan: Plan = {}
    for s in group.sites:
        keep = [i for i, r in enumerate(s.roots) if r not in removed]
        if s.module and len(keep) < len(s.roots):
            plan[(s.module, s.role)] = torch.tensor(keep, dtype=torch.long)
    return plan


# -- rebuilding layers -------------------------------------------------------------------
def _select_inputs(
    w: torch.Tensor, keep: torch.Tensor, in_channels: int, groups: int
) -> torch.Tensor:
    """A conv weight (out, in / groups, kh, kw) without the input channels not in ``keep``
    (original positions; each group keeps the same number)."""
    per, out_per = in_channels // groups, w.shape[0] // groups
    parts = []
    for g in range(groups):
        within = keep[(keep >= g * per) & (keep < (g + 1) * per)] - g * per
        parts.append(w[g * out_per : (g + 1) * out_per].index_select(1, within))
    return torch.cat(parts, dim=0)


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def _pick(t: torch.Tensor, keep: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    t = t.detach()
    return t if keep is None else t.index_select(dim, keep.to(t.device))


def rebuild_conv(m: nn.Conv2d, keeps: dict[str, torch.Tensor]) -> nn.Module:
    w, groups = m.weight.detach(), m.groups
    out_keep, in_keep = keeps.get("out"), keeps.get("in")
    if "depthwise" in keeps:
        out_keep = keeps["depthwise"]
        groups = len(out_keep)
    elif in_keep is not None:
        w = _select_inputs(w, in_keep.to(w.device), m.in_channels, groups)
    w = _pick(w, out_keep)  # (out, in / groups, kh, kw)
    geometry: dict[str, Any] = {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "padding_mode": m.padding_mode,
    }
    new = nn.Conv2d(
        w.shape[1] * groups, w.shape[0], groups=groups, bias=m.bias is not None,
        device=w.device, dtype=w.dtype, **geometry,
    )  # fmt: skip
    new.weight = _param(w, m.weight)
    if m.bias is not None:
        new.bias = _param(_pick(m.bias, out_keep), m.bias)
    return new.train(m.training)


def rebuild_linear(m: nn.Linear, keeps: dict[str, torch.Tensor]) -> nn.Module:
    w = _pick(_pick(m.weight, keeps.get("in"), dim=1), keeps.get("out"))  # (out, in)
    new = nn.Linear(w.shape[1], w.shape[0], m.bias is not None, device=w.device, dtype=w.dtype)
    new.weight = _param(w, m.weight)
    if m.bias is not None:
        new.bias = _param(_pick(m.bias, keeps.get("out")), m.bias)
    return new.train(m.training)


def rebuild_batchnorm(m: nn.BatchNorm2d, keeps: dict[str, torch.Tensor]) -> nn.Module:
    keep = keeps["norm"]
    new = nn.BatchNorm2d(len(keep), m.eps, m.momentum, m.affine, m.track_running_stats)
    if m.affine:
        new.weight = _param(_pick(m.weight, keep), m.weight)
        new.bias = _param(_pick(m.bias, keep), m.bias)
    if m.running_mean is not None and m.running_var is not None:
        new.running_mean = _pick(m.running_mean, keep).clone()
        new.running_var = _pick(m.running_var, keep).clone()
        new.num_batches_tracked = m.num_batches_tracked
    return new.to(m.weight.device if m.affine else keep.device).train(m.training)


def rebuild_layernorm(m: nn.LayerNorm, keeps: dict[str, torch.Tensor]) -> nn.Module:
    keep = keeps["norm"]
    new = nn.LayerNorm(len(keep), m.eps, m.elementwise_affine, bias=m.bias is not None)
    if m.weight is not None:
        new.weight = _param(_pick(m.weight, keep), m.weight)
    if m.bias is not None:
        new.bias = _param(_pick(m.bias, keep), m.bias)
    return new.train(m.training)


REBUILD: dict[type, Callable[..., nn.Module]] = {
    nn.Conv2d: rebuild_conv,
    nn.Linear: rebuild_linear,
    nn.BatchNorm2d: rebuild_batchnorm,
    nn.LayerNorm: rebuild_layernorm,
}


def apply_plan(model: nn.Module, plan: Plan) -> None:
    """Rebuild every planned layer once and swap it in under each of its names."""
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for (name, role), keep in plan.items():
        per_module.setdefault(name, {})[role] = keep
    new: dict[int, nn.Module] = {}
    for name, keeps in per_module.items():
        m = model.get_submodule(name)
        new[id(m)] = REBUILD[type(m)](m, keeps)
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if name and id(m) in new:
            set_module(model, name, new[id(m)])


# -- the stage ---------------------------------------------------------------------------
def example_inputs(ctx: Context) -> Batch:
    """The task's example, else the first calibration batch (to trace and size tensors)."""
    if ctx.task is not None:
        return ctx.task.example_inputs()
    return ctx.need_data("structured pruning (example inputs to trace the model)")[0]


def check_targets(graph: ChannelGraph, config: StructuredConfig) -> None:
    """ConfigError for a target naming (no wildcard) a layer that writes a model output."""
    writes_output = output_producers(graph)
    for pattern in config.targets:
        literal = not pattern.startswith("re:") and not any(c in pattern for c in "*?[")
        if literal and pattern in writes_output:
            raise ConfigError(
                f"{config._where('targets')}: {pattern!r} writes the model's output; removing "
                "its channels would change the output shape; remove it from targets"
            )


def warn(ctx: Context, message: str) -> None:
    ctx.report(f"warning: structured: {message}")
    warnings.warn(f"structured pruning: {message}", stacklevel=3)


def prune_structured(model: nn.Module, config: StructuredConfig, ctx: Context) -> nn.Module:
    """Analyse, score, select and rebuild; the model changes only after every check."""
    graph = analyze(model, example_inputs(ctx), lambda n: any(matches(n, p) for p in config.ignore))
    for message in graph.warnings:
        warn(ctx, message)
    check_targets(graph, config)
    selected = set(ctx.names)
    groups = [g for g in graph.groups if prunable(g, selected)]
    producers = sorted({s.module for g in groups for s in g.sites if s.role == "out"})
    scorer = importance(config.criterion, unit=Unit.CHANNEL)
    scores = scorer(model, producers, ctx) if producers and config.ratio > 0 else {}
    plan: Plan = {}
    for group in groups if scores else []:
        removed, problem = removed_classes(group, class_scores(group, scores), config)
        if problem:
            warn(ctx, problem)
        plan.update(plan_group(group, removed))
    apply_plan(model, plan)
    return model


@register(StructuredConfig, types=(nn.Conv2d, nn.Linear))
def apply_structured(model: nn.Module, config: StructuredConfig, ctx: Context) -> nn.Module:
    return prune_structured(model, config, ctx)
