"""Physical pruning of attention heads and FFN neurons in BERT-like transformer encoders.

Layers are found by structure, not by tracing:

- an attention module holds ``query`` / ``key`` / ``value`` Linear layers and the int
  attributes ``num_attention_heads``, ``attention_head_size`` and ``all_head_size``; its
  output projection is ``output.dense`` of its parent (Hugging Face ``BertSelfAttention``
  inside ``BertAttention``);
- an FFN is a module holding ``intermediate.dense`` -> ``output.dense`` (``BertLayer``).

Every input column of an output projection (a head's dimension, or an FFN neuron) gets a
score, ``feed * ||w_out[:, j]||_2``: with criterion ``activation`` (the default) ``feed`` is
the mean ``|x_j|`` of the projection's input over every token position of the calibration
data; with ``magnitude`` it is the L2 norm of the row producing ``x_j`` (``value``'s row for
a head's dimension, ``intermediate.dense``'s row for a neuron). A head's score is the sum
over its dimensions. Each selected attention module loses its ``heads`` lowest-scoring heads
and each selected FFN its ``round(ffn_ratio * n)`` lowest-scoring neurons (keeping one).

The rows of ``query`` / ``key`` / ``value`` (weight and bias) and the columns of the output
projection are removed with ``index_select`` by rebuilding them as smaller standard
``nn.Linear`` layers, which artifacts record; the attention module's head count attributes
are set from the new shapes, by the same function that artifacts run after loading.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import torch
from torch import nn

from slimkit.calib.capture import run_batches, watching
from slimkit.compressed import after_replay
from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.data import Batch
from slimkit.errors import ModelError
from slimkit.model_info import PROJECTIONS, head_attrs, is_attention
from slimkit.prune.structured import Plan, apply_plan
from slimkit.registry import register


class HeadsCriterion(str, enum.Enum):
    ACTIVATION = "activation"  # mean |input| of the output projection x its column norm
    MAGNITUDE = "magnitude"  # producing row norm x output column norm


@dataclasses.dataclass(frozen=True)
class HeadsFFNConfig(StageConfig):
    """Remove ``heads`` attention heads per attention layer and ``ffn_ratio`` of the FFN
    neurons per layer, the lowest-scoring by ``criterion`` (``activation`` needs calibration
    data; ``magnitude`` needs none). ``compensate`` adds what the removed columns contribute
    on average over the calibration data to the output projection's bias (needs the data
    with either criterion). A layer is pruned when all its Linear layers are selected."""

    kind = "prune"
    method = "heads-ffn"

    heads: int = 2
    ffn_ratio: float = 0.3
    criterion: HeadsCriterion = HeadsCriterion.ACTIVATION
    compensate: bool = False

    def validate(self) -> None:
        super().validate()
        if self.heads < 0:
            self.fail("heads", "an integer >= 0 (heads removed per attention layer)")
        if not 0.0 <= self.ffn_ratio < 1.0:
            self.fail("ffn_ratio", "a fraction in [0, 1) of the FFN neurons removed per layer")

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        """ModelError for a model without attention layers; ConfigError for ``heads`` not
        below a selected attention layer's head count."""
        attention, _ = selected_sites(model, names)
        check_heads(attention, self)


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    name: str  # the module holding query / key / value
    out: str  # its output projection
    n_heads: int
    head_size: int


@dataclasses.dataclass(frozen=True)
class FFNSite:
    up: str  # intermediate.dense
    down: str  # output.dense


# -- finding layers ----------------------------------------------------------------------
def projection(m: nn.Module, name: str) -> nn.Linear:
    """The Linear submodule of ``m`` at ``name`` (a dotted path)."""
    layer = m.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{name} is a {type(layer).__name__}, not a Linear")
    return layer


def _consistent(m: nn.Module) -> bool:
    """Head attributes that agree with each other and with every projection's rows."""
    n, d, total = head_attrs(m)
    rows = {projection(m, p).out_features for p in PROJECTIONS}
    return n * d == total and rows == {total}


def _child(m: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        child = getattr(m, part, None)
        if not isinstance(child, nn.Module):
            return None
        m = child
    return m


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Attention modules whose parent's ``output.dense`` reads their ``all_head_size``."""
    sites = []
    for parent_name, parent in model.named_modules():
        out = _child(parent, "output.dense")
        for child_name, m in parent.named_children():
            if not (is_attention(m) and _consistent(m) and isinstance(out, nn.Linear)):
                continue
            n, d, total = head_attrs(m)
            where = _join(parent_name, child_name)
            if out.in_features == total:
                sites.append(AttentionSite(where, _join(parent_name, "output.dense"), n, d))
    return sites


def find_ffn(model: nn.Module) -> list[FFNSite]:
    """Modules holding ``intermediate.dense`` -> ``output.dense`` of matching widths."""
    sites = []
    for name, m in model.named_modules():
        up, down = _child(m, "intermediate.dense"), _child(m, "output.dense")
        if not (isinstance(up, nn.Linear) and isinstance(down, nn.Linear)):
            continue
        if up.out_features == down.in_features:
            sites.append(FFNSite(_join(name, "intermediate.dense"), _join(name, "output.dense")))
    return sites


@after_replay
def sync_head_counts(model: nn.Module) -> None:
    """Set each attention module's ``num_attention_heads`` / ``all_head_size`` from its
    ``query`` rows (``attention_head_size`` unchanged); other modules are left alone."""
    for m in model.modules():
        if not is_attention(m):
            continue
        _, d, _ = head_attrs(m)
        rows = projection(m, "query").out_features
        if d > 0 and rows % d == 0:
            for attr, value in (("num_attention_heads", rows // d), ("all_head_size", rows)):
                setattr(m, attr, value)


# -- pure math ---------------------------------------------------------------------------
def column_scores(feed: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """``feed_j * ||w_out[:, j]||_2`` for each input column ``j``: feed (K,), w_out (N, K)
    -> (K,) float64."""
    return feed.double() * w_out.detach().double().norm(dim=0)


def head_scores(columns: torch.Tensor, head_size: int) -> torch.Tensor:
    """Sum of each head's column scores: (H * d,) -> (H,)."""
    return columns.reshape(-1, head_size).sum(dim=1)


def keep_highest(scores: torch.Tensor, n_removed: int) -> torch.Tensor:
    """Sorted indices of all but the ``n_removed`` lowest ``scores`` (ties: earlier go)."""
    order = torch.argsort(scores, stable=True)
    return order[n_removed:].sort().values


def head_columns(heads: torch.Tensor, head_size: int) -> torch.Tensor:
    """Column indices of the given heads: (h,) -> (h * d,)."""
    return (heads[:, None] * head_size + torch.arange(head_size)).reshape(-1)


def neurons_removed(n: int, ratio: float) -> int:
    return min(round(ratio * n), n - 1)


# -- scoring -----------------------------------------------------------------------------
def input_means(
    model: nn.Module, names: Sequence[str], data: Sequence[Batch]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per named layer, the mean ``|x|`` and the mean ``x`` of each input feature over all
    rows of ``data``: two (K,) float64 tensors (zeros for a layer the data never reaches)."""
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    counts = dict.fromkeys(names, 0)

    def watch(name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()  # (tokens, K)
        now = (flat.abs().sum(dim=0), flat.sum(dim=0))
        sums[name] = (sums[name][0] + now[0], sums[name][1] + now[1]) if name in sums else now
        counts[name] += flat.shape[0]

    with watching(model, names, watch):
        run_batches(model, data)
    out = {}
    for name in names:
        zero = torch.zeros(projection(model, name).in_features, dtype=torch.float64)
        a, m = sums.get(name, (zero, zero))
        n = max(counts[name], 1)
        out[name] = (a / n, m / n)
    return out


def magnitude_feeds(model: nn.Module, producers: dict[str, str]) -> dict[str, torch.Tensor]:
    """Per output projection, the L2 norm of each row of the Linear producing its input;
    ``producers`` maps each projection to that Linear."""
    rows = {out: projection(model, up).weight for out, up in producers.items()}
    return {out: w.detach().double().norm(dim=1) for out, w in rows.items()}


def bias_shift(w_out: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """What the input columns not in ``kept`` add to the output on average:
    ``w_out[:, removed] @ mean[removed]``; w_out (N, K), mean (K,) -> (N,)."""
    removed = torch.ones(w_out.shape[1], dtype=torch.bool)
    removed[kept] = False
    return w_out.detach().double()[:, removed] @ mean.double()[removed]


def compensate_biases(model: nn.Module, plan: Plan, means: dict[str, torch.Tensor]) -> None:
    """Add each planned output projection's ``bias_shift`` to its bias (made when missing)."""
    for (name, role), kept in plan.items():
        if role != "in" or name not in means:
            continue
        m = projection(model, name)
        shift = bias_shift(m.weight, means[name], kept).to(m.weight.dtype)  # (N,)
        bias = m.bias
        if bias is None:
            bias = m.bias = nn.Parameter(torch.zeros_like(shift), m.weight.requires_grad)
        with torch.no_grad():
            bias.add_(shift)


# -- planning ----------------------------------------------------------------------------
def selected_sites(
    model: nn.Module, names: Sequence[str]
) -> tuple[list[AttentionSite], list[FFNSite]]:
    """The attention and FFN sites whose Linear layers are all in ``names``; ModelError
    when the model holds no attention layer."""
    attention, ffn = find_attention(model), find_ffn(model)
    if not attention:
        raise ModelError(
            "heads-ffn pruning found no BERT-like attention layer: a module with query, key "
            "and value Linear layers and num_attention_heads / attention_head_size / "
            "all_head_size, whose parent has output.dense"
        )
    chosen = set(names)
    attention = [
        s for s in attention
        if {_join(s.name, p) for p in PROJECTIONS} | {s.out} <= chosen
    ]  # fmt: skip
    ffn = [s for s in ffn if {s.up, s.down} <= chosen]
    return attention, ffn


def check_heads(sites: Sequence[AttentionSite], config: HeadsFFNConfig) -> None:
    for s in sites:
        if config.heads >= s.n_heads:
            config.fail(
                "heads", f"fewer than the {s.n_heads} heads of {s.name} (at most {s.n_heads - 1})"
            )


def plan_heads(
    model: nn.Module, sites: Sequence[AttentionSite], feed: dict[str, torch.Tensor], heads: int
) -> Plan:
    plan: Plan = {}
    for s in sites:
        columns = column_scores(feed[s.out], projection(model, s.out).weight)  # (H * d,)
        kept = keep_highest(head_scores(columns, s.head_size), heads)  # (H - heads,)
        cols = head_columns(kept, s.head_size)
        plan.update({(_join(s.name, p), "out"): cols for p in PROJECTIONS})
        plan[(s.out, "in")] = cols
    return plan


def plan_ffn(
    model: nn.Module, sites: Sequence[FFNSite], feed: dict[str, torch.Tensor], ratio: float
) -> Plan:
    plan: Plan = {}
    for s in sites:
        w_out = projection(model, s.down).weight  # (hidden, n)
        kept = keep_highest(
            column_scores(feed[s.down], w_out), neurons_removed(w_out.shape[1], ratio)
        )
        plan[(s.up, "out")] = kept
        plan[(s.down, "in")] = kept
    return plan


def prune_heads_ffn(model: nn.Module, config: HeadsFFNConfig, ctx: Context) -> nn.Module:
    """Find, check, score and rebuild; the model changes only after every check."""
    attention, ffn = selected_sites(model, ctx.names)
    check_heads(attention, config)
    if config.heads == 0:
        attention = []
    if config.ffn_ratio == 0.0:
        ffn = []
    producers = {s.out: _join(s.name, "value") for s in attention}
    producers.update({s.down: s.up for s in ffn})
    if not producers:
        ctx.report("heads-ffn: nothing to prune")
        return model
    activation = config.criterion is HeadsCriterion.ACTIVATION
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if activation or config.compensate:
        data = ctx.need_data(f"heads-ffn pruning ({'activation' if activation else 'compensate'})")
        stats = input_means(model, list(producers), data)
    feed = {k: v[0] for k, v in stats.items()} if activation else magnitude_feeds(model, producers)
    plan = plan_heads(model, attention, feed, config.heads)
    plan.update(plan_ffn(model, ffn, feed, config.ffn_ratio))
    if config.compensate:
        compensate_biases(model, plan, {k: v[1] for k, v in stats.items()})
    apply_plan(model, plan)
    sync_head_counts(model)
    ctx.report(f"heads-ffn: {len(attention)} attention layers, {len(ffn)} FFNs pruned")
    return model


@register(HeadsFFNConfig, types=(nn.Linear,))
def apply_heads_ffn(model: nn.Module, config: HeadsFFNConfig, ctx: Context) -> nn.Module:
    return prune_heads_ffn(model, config, ctx)
