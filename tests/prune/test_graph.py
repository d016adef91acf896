"""Channel dependency analysis (prune/graph.py) on tiny models; the models are shared with
test_structured.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import ModelError
from slimkit.prune.graph import OUTPUT, ChannelGraph, ChannelGroup, analyze, output_producers


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups), nn.BatchNorm2d(cout)
    )


class ResidualChain(nn.Module):
    """Residual adds and a flatten of (8, 2, 2) into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a1, self.a2 = conv_bn(8, 8), conv_bn(8, 8)
        self.b1, self.b2 = conv_bn(8, 8), conv_bn(8, 8)
        self.down = conv_bn(8, 8, stride=2)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4, 4)
        h = F.relu(self.stem(x))  # (B, 8, 4, 4)
        h = F.relu(h + self.a2(F.relu(self.a1(h))))
        h = F.relu(self.b2(F.relu(self.b1(h))) + h)
        h = F.relu(self.down(h))  # (B, 8, 2, 2)
        return self.fc(h.flatten(1))  # (B, 4)


class ConcatSplit(nn.Module):
    """Two branches concatenated, chunked in halves, recombined; a cat feeds the head."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = conv_bn(3, 6, 1), conv_bn(3, 6)
        self.mix1, self.mix2 = conv_bn(6, 8), conv_bn(6, 8)
        self.side = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4, 4)
        h = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)  # (B, 12, 4, 4)
        p, q = h.chunk(2, dim=1)  # (B, 6, 4, 4) each
        z = F.relu(self.mix1(p) + self.mix2(q))  # (B, 8, 4, 4)
        z = torch.cat([z, F.relu(self.side(x))], dim=1)  # (B, 12, 4, 4)
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))  # (B, 4)


class GroupedDepthwise(nn.Module):
    """A grouped conv (groups=2), a depthwise + pointwise pair, BatchNorm after each."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.grouped = conv_bn(8, 12, groups=2)
        self.depthwise = conv_bn(12, 12, groups=12)
        self.pointwise = conv_bn(12, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4, 4)
        h = F.relu(self.stem(x))  # (B, 8, 4, 4)
        h = F.relu(self.grouped(h))  # (B, 12, 4, 4)
        h = F.relu(self.depthwise(h))  # (B, 12, 4, 4)
        h = F.relu(self.pointwise(h))  # (B, 16, 4, 4)
        return self.fc(h.mean(dim=(2, 3)))  # (B, 4)


class MLPBlock(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Transformerish(nn.Module):
    """Input projection, two pre-norm MLP blocks with residuals, final LayerNorm, head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.blocks = nn.Sequential(MLPBlock(16, 32), MLPBlock(16, 32))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 6)
        h = self.norm(self.blocks(self.proj(x)))  # (B, T, 16)
        return self.head(h.mean(dim=1))  # (B, 4)


class GRUHead(nn.Module):
    """Convolutions, then the (B, H*W, C) sequence into a GRU and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.gru = nn.GRU(6, 10, batch_first=True)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4, 4)
        h = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, 6, 4, 4)
        seq = h.flatten(2).transpose(1, 2)  # (B, 16, 6)
        out, _ = self.gru(seq)  # (B, 16, 10)
        return self.fc(out[:, -1])  # (B, 4)


class SharedConv(nn.Module):
    """One conv applied twice: both calls' channels are one space."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4, 4)
        h = F.relu(self.conv(F.relu(self.stem(x))))  # (B, 8, 4, 4)
        h = F.relu(self.conv(h))  # (B, 8, 4, 4)
        return self.fc(h.amax(dim=(2, 3)))  # (B, 4)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4, 4)
        h = self.gate(F.relu(self.conv1(x)))  # (B, 8, 4, 4)
        return self.fc(F.relu(self.conv2(h)).mean(dim=(2, 3)))  # (B, 4)


IMAGE = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
SEQUENCE = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))


def group_of(graph: ChannelGraph, module: str, role: str = "out") -> ChannelGroup:
    for g in graph.groups:
        if any(s.module == module and s.role == role for s in g.sites):
            return g
    raise AssertionError(f"no group holds {module} {role}")


def sites(group: ChannelGroup) -> set[tuple[str, str]]:
    return {(s.module, s.role) for s in group.sites}


def free(group: ChannelGroup) -> list[int]:
    return [r for r in group.classes if r not in group.blocked]


def test_residual_adds_join_producers_into_one_group() -> None:
    graph = analyze(ResidualChain().eval(), IMAGE)
    g = group_of(graph, "stem.0")
    assert {("stem.0", "out"), ("a2.0", "out"), ("b2.0", "out")} <= sites(g)
    assert {("a1.0", "in"), ("b1.0", "in"), ("down.0", "in"), ("stem.1", "norm")} <= sites(g)
    assert len(g.classes) == 8 and not g.blocked
    inner = group_of(graph, "a1.0")
    assert sites(inner) == {("a1.0", "out"), ("a1.1", "norm"), ("a2.0", "in")}


def test_flatten_into_linear_repeats_each_channel_per_position() -> None:
    graph = analyze(ResidualChain().eval(), IMAGE)
    g = group_of(graph, "down.0")
    fc_in = next(s for s in g.sites if s.role == "in" and s.module == "fc")
    out = next(s for s in g.sites if s.role == "out")
    assert fc_in.roots == [r for r in out.roots for _ in range(4)]  # (8, 2, 2) flattened


def test_cat_concatenates_and_chunk_constrains_evenly() -> None:
    graph = analyze(ConcatSplit().eval(), IMAGE)
    g = group_of(graph, "left.0")
    left, right = (next(s for s in g.sites if s.module == m) for m in ("left.0", "right.0"))
    chunk = next(s for s in g.sites if s.role == "chunk")
    assert chunk.groups == 2 and chunk.roots == left.roots + right.roots
    mix1 = next(s for s in g.sites if s.module == "mix1.0" and s.role == "in")
    assert mix1.roots == left.roots  # the first half of the cat
    head = group_of(graph, "fc", "in")
    fc_in = next(s for s in head.sites if s.module == "fc")
    side = next(s for s in head.sites if s.module == "side")
    mix = next(s for s in head.sites if s.module == "mix1.0" and s.role == "out")
    assert fc_in.roots == mix.roots + side.roots  # cat offsets
    assert group_of(graph, "mix2.0") is head  # the add joins mix1 and mix2


def test_grouped_conv_sites_are_even_and_depthwise_passes_through() -> None:
    graph = analyze(GroupedDepthwise().eval(), IMAGE)
    g = group_of(graph, "grouped.0")
    grouped = next(s for s in g.sites if s.module == "grouped.0")
    assert grouped.groups == 2
    assert {("depthwise.0", "depthwise"), ("depthwise.1", "norm"), ("pointwise.0", "in")} <= sites(
        g
    )
    assert next(s for s in group_of(graph, "stem.0").sites if s.role == "in").groups == 2


def test_layer_norm_and_mlp_hidden_spaces() -> None:
    graph = analyze(Transformerish().eval(), SEQUENCE)
    stream = group_of(graph, "proj")
    assert {("blocks.0.fc2", "out"), ("blocks.1.fc2", "out"), ("norm", "norm")} <= sites(stream)
    assert ("head", "in") in sites(stream) and not stream.blocked
    hidden = group_of(graph, "blocks.0.fc1")
    assert sites(hidden) == {("blocks.0.fc1", "out"), ("blocks.0.fc2", "in")}


def test_model_outputs_are_blocked() -> None:
    graph = analyze(ResidualChain().eval(), IMAGE)
    g = group_of(graph, "fc")
    assert set(g.blocked.values()) == {OUTPUT} and not free(g)
    assert output_producers(graph) == {"fc"}


def test_gru_blocks_what_it_reads_with_a_warning() -> None:
    graph = analyze(GRUHead().eval(), IMAGE)
    g = group_of(graph, "conv2")
    assert not free(g)
    assert any("'gru' (GRU)" in w for w in graph.warnings)
    assert free(group_of(graph, "conv1.0"))


def test_a_layer_called_twice_has_one_site_per_role() -> None:
    graph = analyze(SharedConv().eval(), IMAGE)
    g = group_of(graph, "conv")
    assert sites(g) == {("stem.0", "out"), ("stem.1", "norm"), ("conv", "in"), ("conv", "out"),
                        ("fc", "in")}  # fmt: skip
    assert len(g.classes) == 8


def test_untraceable_model_names_the_op_and_module() -> None:
    with pytest.raises(
        ModelError, match=r"control flow on `gt\(sum_1, 0\)` in module 'gate'.*ignore"
    ):
        analyze(Untraceable().eval(), IMAGE)


def test_a_leaf_kept_whole_blocks_its_channels() -> None:
    graph = analyze(Untraceable().eval(), IMAGE, leaf=lambda name: name == "gate")
    assert not free(group_of(graph, "conv1"))
    assert free(group_of(graph, "conv2"))
    assert any("'gate' (Gate)" in w for w in graph.warnings)


def test_split_and_channel_slices_block() -> None:
    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.split(self.conv(x), [4, 4], dim=1)
            c = self.conv2(x)[:, :4]
            return self.fc(torch.cat([a * b, c], dim=1).mean(dim=(2, 3)))

    graph = analyze(Sliced().eval(), IMAGE)
    assert not free(group_of(graph, "conv")) and not free(group_of(graph, "conv2"))


def test_analysis_leaves_training_mode_and_statistics_alone() -> None:
    model = ResidualChain().train()
    before = model.stem[1].running_mean.clone()
    analyze(model, IMAGE)
    assert model.training and model.stem[1].training
    assert torch.equal(model.stem[1].running_mean, before)
