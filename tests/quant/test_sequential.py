"""Block-by-block calibration: block discovery, input capture, chaining, fallbacks."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest
import torch
from torch import nn

from slimkit.calib.sequential import (
    Group,
    PerInput,
    block_of,
    capture,
    find_blocks,
    input_rows,
    quantize_sequential,
)
from slimkit.errors import DataError
from slimkit.select import swap_modules

D, HEADS = 8, 2


class Block(nn.Module):
    """Attention-like block: takes a mask keyword, returns (hidden, attention weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.norm = nn.LayerNorm(D)

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.q(h) @ self.k(h).transpose(1, 2) / D**0.5  # (B, T, T)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], -1e4)
        attn = scores.softmax(-1)  # (B, T, T)
        h = self.norm(h + self.o(attn @ self.v(h)))  # (B, T, D)
        return h + self.fc2(torch.relu(self.fc1(h))), attn


class Tiny(nn.Module):
    """Embedding, three blocks called with a mask keyword, and a head after them."""

    def __init__(self, n_blocks: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, D)
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, D)
        for block in self.blocks:
            h, _ = block(h, mask=attention_mask)
        return self.head(h[:, 0])


class Parallel(nn.Module):
    """Same-type blocks applied side by side to one input: not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.ReLU()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(head(x) for head in self.heads)  # type: ignore[return-value]


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        t = 4 + i
        mask = torch.ones(2, t, dtype=torch.bool)
        mask[1, -2:] = False
        out.append({"ids": torch.randint(0, 20, (2, t), generator=g), "attention_mask": mask})
    return out


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]


@pytest.fixture
def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def full_pass_inputs(model: nn.Module, names: list[str], data: list[Any]) -> dict[str, list]:
    """Inputs of each named layer on plain full-model passes, padded tokens left out."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    mask: list[torch.Tensor] = []

    def record(name: str, x: torch.Tensor) -> None:
        seen[name].append(x[mask[0]] if x.dim() == 3 else x.clone())

    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0]))
        for n in names
    ]
    with torch.no_grad():
        for batch in data:
            mask[:] = [batch["attention_mask"]]
            model(**batch)
    for h in handles:
        h.remove()
    return seen


class Recorder:
    """A step that records the groups and the inputs their layers see, and changes nothing."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, list[str]]] = []
        self.seen: dict[str, list[torch.Tensor]] = defaultdict(list)

    def __call__(self, group: Group) -> None:
        self.groups.append((group.prefix, list(group.names)))

        def watch(name: str, x: torch.Tensor) -> None:
            self.seen[group.full_name(name)].append(x.clone())

        with group.watching(watch):
            group.run()


# -- discovery -----------------------------------------------------------------------------
def test_find_blocks_picks_the_repeated_blocks(tiny: Tiny) -> None:
    assert find_blocks(tiny, linear_names(tiny)) == "blocks"
    assert find_blocks(tiny, ["emb", "head"]) is None  # no selected layer inside
    assert block_of("blocks.2.fc1", "blocks") == 2
    assert block_of("head", "blocks") is None


def test_find_blocks_ignores_containers_of_selected_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    assert find_blocks(model, ["0", "1", "2"]) is None
    mixed = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.ReLU())
    assert find_blocks(mixed, ["0.0"]) is None  # children of two types


# -- capture -------------------------------------------------------------------------------
def test_capture_matches_full_pass_inputs_of_first_block(tiny: Tiny) -> None:
    data = batches()
    expected: list[tuple[tuple, dict]] = []
    handle = tiny.blocks[0].register_forward_pre_hook(
        lambda _m, args, kwargs: expected.append((args, kwargs)), with_kwargs=True
    )
    with torch.no_grad():
        for batch in data:
            tiny(**batch)
    handle.remove()
    with torch.no_grad():
        plan = capture(tiny, tiny.blocks, "blocks", ["emb", "head"], data)
    assert plan is not None and plan.chained
    assert plan.before == ["emb"]  # the head runs after the blocks
    assert len(plan.inputs) == len(data)
    for got, (args, kwargs) in zip(plan.inputs, expected, strict=True):
        assert torch.equal(got.args[0], args[0])
        assert got.kwargs.keys() == kwargs.keys() == {"mask"}
        assert torch.equal(got.kwargs["mask"], kwargs["mask"])
        assert got.keep is not None and torch.equal(got.keep, kwargs["mask"])


def test_capture_detects_blocks_that_are_not_a_chain() -> None:
    model = Parallel().eval()
    with torch.no_grad():
        plan = capture(model, model.heads, "heads", [], [torch.randn(2, D)])
    assert plan is not None and not plan.chained


# -- the driver ----------------------------------------------------------------------------
def test_block_by_block_inputs_equal_full_pass(tiny: Tiny) -> None:
    data = batches()
    names = linear_names(tiny)
    expected = full_pass_inputs(tiny, names, data)
    step = Recorder()
    quantize_sequential(tiny, names, data, step)
    assert [prefix for prefix, _ in step.groups] == ["", "blocks.0.", "blocks.1.", "blocks.2.", ""]
    assert step.groups[0][1] == ["emb"] and step.groups[-1][1] == ["head"]
    assert set(step.seen) == set(names)
    for name in names:
        assert len(step.seen[name]) == len(expected[name]) == len(data)
        for got, want in zip(step.seen[name], expected[name], strict=True):
            assert float((got - want).abs().max()) <= 1e-6


def test_each_block_runs_a_fixed_number_of_times(tiny: Tiny) -> None:
    data = batches()
    calls: Counter[int] = Counter()
    for i, block in enumerate(tiny.blocks):
        block.register_forward_pre_hook(lambda *_a, i=i: calls.update([i]))
    quantize_sequential(tiny, linear_names(tiny), data, Recorder())
    n = len(data)
    # block 0: capture, the embedding's pass and the recapture after it stop there (3n),
    # then stats (n), advance (n) and the head's full pass (n); block 1: the chain check on
    # the first batch stops there (1), stats, advance, the head's pass; block 2: no advance
    assert calls == {0: 6 * n, 1: 1 + 3 * n, 2: 2 * n}


def test_not_a_chain_falls_back_to_one_full_pass() -> None:
    torch.manual_seed(0)
    model = Parallel().eval()
    data = [torch.randn(3, D), torch.randn(2, D)]
    names = ["heads.0.0", "heads.1.0", "heads.2.0"]
    expected = full_pass_inputs_plain(model, names, data)
    step = Recorder()
    quantize_sequential(model, names, data, step)
    assert step.groups == [("", names)]
    for name in names:
        for got, want in zip(step.seen[name], expected[name], strict=True):
            assert torch.equal(got, want)


def full_pass_inputs_plain(model: nn.Module, names: list[str], data: list[torch.Tensor]) -> dict:
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen[n].append(args[0].clone())
        )
        for n in names
    ]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return seen


def test_layer_shared_between_blocks_is_converted_once(tiny: Tiny) -> None:
    tiny.blocks[2].fc2 = tiny.blocks[0].fc2  # one module under two names
    names = [*linear_names(tiny), "blocks.2.fc2"]  # named_modules lists a shared one once
    handled: list[str] = []

    def step(group: Group) -> None:
        handled.extend(group.full_name(n) for n in group.names)
        swap_modules(group.root, group.names, lambda _n, m: nn.Sequential(m))

    quantize_sequential(tiny, names, batches(), step)
    assert "blocks.2.fc2" not in handled and handled.count("blocks.0.fc2") == 1
    assert tiny.blocks[2].fc2 is tiny.blocks[0].fc2
    assert isinstance(tiny.blocks[2].fc2, nn.Sequential)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Sequential(nn.Linear(D, D)), nn.Sequential(nn.Linear(D, D)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_nan_entering_first_block_is_a_data_error_before_any_step() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, D)
    x[1, 3] = float("nan")
    steps: list[Group] = []
    with pytest.raises(DataError, match=r"'blocks\.0'.*NaN"):
        quantize_sequential(Chain(), ["blocks.0.0", "blocks.1.0"], [x], steps.append)
    assert steps == []


def test_no_data_is_a_data_error(tiny: Tiny) -> None:
    with pytest.raises(DataError, match="at least one batch"):
        quantize_sequential(tiny, linear_names(tiny), [], Recorder())


# -- helpers -------------------------------------------------------------------------------
def test_input_rows_of_a_conv_match_its_weight_columns() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        patches = input_rows(conv, x)  # (B * L, C * kh * kw)
        y = patches @ conv.weight.reshape(4, -1).T  # (B * L, O)
        want = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
    assert float((y - want).abs().max()) <= 1e-5


def test_per_input_memo_shares_only_the_same_tensor() -> None:
    memo, calls = PerInput(), []
    x, y = torch.ones(2), torch.ones(2)
    for t in (x, x, y, y):
        memo.get(t, ("rows",), lambda t=t: calls.append(t))
    assert len(calls) == 2
    y.add_(1)  # changed in place: computed again
    memo.get(y, ("rows",), lambda: calls.append(y))
    assert len(calls) == 3


def test_model_that_is_itself_a_sequential_of_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(D, D), nn.ReLU()) for _ in range(3)))
    names = ["0.0", "1.0", "2.0"]
    assert find_blocks(model, names) == ""
    data = [torch.randn(4, D), torch.randn(3, D)]
    expected = full_pass_inputs_plain(model, names, data)
    step = Recorder()
    quantize_sequential(model, names, data, step)
    assert step.groups == [("0.", ["0"]), ("1.", ["0"]), ("2.", ["0"])]
    for name in names:
        for got, want in zip(step.seen[name], expected[name], strict=True):
            assert float((got - want).abs().max()) <= 1e-6


def test_one_block_listed_twice_falls_back_to_one_full_pass(tiny: Tiny) -> None:
    tiny.blocks[1] = tiny.blocks[0]
    names = [n for n, m in tiny.named_modules(remove_duplicate=False) if type(m) is nn.Linear]
    step = Recorder()
    quantize_sequential(tiny, names, batches(), step)
    assert step.groups == [("", names)]  # the chain check fails: one full pass
