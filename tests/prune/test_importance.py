"""Importance criteria and keep-masks: exact counts, floors, order, and each criterion's math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.config import Scope
from slimkit.context import Context
from slimkit.errors import DataError
from slimkit.prune.importance import (
    Criterion,
    Unit,
    channel_norms,
    fpgm_scores,
    importance,
    input_sq_sums,
    keep_masks,
    magnitude_scores,
    min_keep,
    taylor_sums,
    unique_names,
)
from tests.prune.toys import ToyTask, inputs, net

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def layer_scores(draw: st.DrawFn) -> list[torch.Tensor]:
    """1..4 layers of 1..60 nonnegative scores, each layer on its own scale (1e-3..1e3)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    sizes = draw(st.lists(st.integers(1, 60), min_size=1, max_size=4))
    return [
        torch.from_numpy(rng.random(n) * 10.0 ** rng.uniform(-3, 3)).float().reshape(-1)
        for n in sizes
    ]


fractions = st.floats(0.0, 0.99)
densities = st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.5])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| relative to the largest |want| (0 when both are zero)."""
    assert got.shape == want.shape
    scale = float(want.abs().max()) if want.numel() else 0.0
    return float((got.double() - want.double()).abs().max()) / scale if scale else 0.0


def normalised(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return s / s.mean() if float(s.mean()) > 0 else s


# -- keep_masks ----------------------------------------------------------------------------
@SETTINGS
@given(scores=layer_scores(), sparsity=fractions, min_density=densities)
def test_layer_scope_exact_per_layer_with_floor_and_highest_kept(
    scores: list[torch.Tensor], sparsity: float, min_density: float
) -> None:
    keeps = keep_masks(scores, sparsity, Scope.LAYER, min_density)
    for s, keep in zip(scores, keeps, strict=True):
        n = s.numel()
        assert keep.shape == s.shape and keep.dtype == torch.bool
        floor = min_keep(n, min_density)
        assert int(keep.sum()) == max(n - round(sparsity * n), floor)
        if min_density > 0:
            assert int(keep.sum()) >= max(1, math.ceil(min_density * n - 1e-9))
        if keep.any() and (~keep).any():
            assert float(s[~keep].max()) <= float(s[keep].min())


@SETTINGS
@given(scores=layer_scores(), sparsity=fractions, min_density=densities, norm=st.booleans())
def test_global_scope_exact_total_floor_and_highest_kept(
    scores: list[torch.Tensor], sparsity: float, min_density: float, norm: bool
) -> None:
    keeps = keep_masks(scores, sparsity, Scope.GLOBAL, min_density, normalize=norm)
    total = sum(s.numel() for s in scores)
    floors = [min_keep(s.numel(), min_density) for s in scores]
    pruned = sum(int((~k).sum()) for k in keeps)
    assert pruned == min(round(sparsity * total), total - sum(floors))  # exact, not just close
    assert abs(pruned / total - sparsity) <= 0.5 / total + 1e-12 or pruned == total - sum(floors)
    compared = [normalised(s) if norm else s.double() for s in scores]
    dropped = [c[~k] for c, k in zip(compared, keeps, strict=True)]
    worst_dropped = max((float(d.max()) for d in dropped if d.numel()), default=-math.inf)
    for c, keep, floor in zip(compared, keeps, floors, strict=True):
        assert int(keep.sum()) >= floor
        if int(keep.sum()) > floor:  # a layer above its floor keeps only what beat the drops
            assert float(c[keep].min()) >= worst_dropped


def test_global_normalisation_makes_scaled_layers_equal() -> None:
    base = torch.rand(40)
    a, b = keep_masks([base, base * 1e4], 0.5, Scope.GLOBAL, normalize=True)
    assert torch.equal(a, b) and int(a.sum()) == 20
    raw_a, raw_b = keep_masks([base, base * 1e4], 0.5, Scope.GLOBAL, normalize=False)
    assert int(raw_a.sum()) == min_keep(40, 0.01) == 1  # raw: the small layer goes first
    assert int(raw_b.sum()) == 39


def test_floor_keeps_one_weight_of_a_layer_global_scope_would_empty() -> None:
    small, big = torch.rand(50) * 1e-6, torch.rand(50) + 1.0
    ks, kb = keep_masks([small, big], 0.5, Scope.GLOBAL, min_density=0.01, normalize=False)
    assert int(ks.sum()) == 1 and bool(ks[small.argmax()])  # its best weight
    assert int((~ks).sum()) + int((~kb).sum()) == 50  # the other layer makes up for it
    (empty,) = keep_masks([small], 0.99, Scope.LAYER, min_density=0.0)
    assert int(empty.sum()) == round(50 - 0.99 * 50)


def test_channel_scores_give_channel_masks() -> None:
    w = torch.randn(10, 3, 3, 3)
    w[[2, 7]] *= 0.01
    (keep,) = keep_masks([channel_norms(w, 1)], 0.2, Scope.LAYER)
    assert keep.shape == (10,) and torch.equal(torch.where(~keep)[0], torch.tensor([2, 7]))


@pytest.mark.parametrize(("n", "density", "want"), [(1, 0.01, 1), (100, 0.07, 7), (3, 0.0, 0)])
def test_min_keep_rounds_up_without_float_noise(n: int, density: float, want: int) -> None:
    assert min_keep(n, density) == want


# -- per-criterion math ---------------------------------------------------------------------
def test_magnitude_and_channel_norms() -> None:
    w = torch.randn(6, 2, 3, 3)
    assert torch.equal(magnitude_scores(w), w.abs())
    assert rel_err(channel_norms(w, 1), w.abs().sum(dim=(1, 2, 3))) <= 1e-6
    assert rel_err(channel_norms(w, 2), w.pow(2).sum(dim=(1, 2, 3)).sqrt()) <= 1e-6


@SETTINGS
@given(
    pairs=st.integers(1, 5),
    k=st.integers(1, 12),
    where=st.integers(0, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_fpgm_lowest_for_the_mean_of_symmetric_filters(
    pairs: int, k: int, where: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(pairs, k, generator=g) + 0.1 * torch.sign(torch.randn(pairs, k, generator=g))
    filters = torch.cat([f, -f])  # symmetric about 0, their mean and geometric median
    centre = where % (2 * pairs + 1)
    w = torch.cat([filters[:centre], torch.zeros(1, k), filters[centre:]])  # (2p + 1, k)
    scores = fpgm_scores(w.reshape(2 * pairs + 1, 1, k, 1))
    others = torch.cat([scores[:centre], scores[centre + 1 :]])
    # each other filter p is farther from all by at least ||p|| (triangle inequality)
    margin = float(f.norm(dim=1).min())
    assert float(scores[centre]) <= float(others.min()) - 0.5 * margin


def test_fpgm_is_summed_distance() -> None:
    w = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    want = torch.tensor([5.0 + 1.0, 5.0 + math.sqrt(9 + 9), 1.0 + math.sqrt(18)])
    assert rel_err(fpgm_scores(w), want) <= 1e-6


CONVS = [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
    dict(in_channels=2, out_channels=2, kernel_size=(2, 3), dilation=2, padding=(1, 0)),
]


@pytest.mark.parametrize("conv_args", CONVS)
def test_conv_input_norms_are_those_of_the_unfolded_input(conv_args: dict) -> None:
    conv = nn.Conv2d(**conv_args)
    x = torch.randn(3, conv.in_channels, 7, 6)
    got = input_sq_sums(conv, x)  # (C_in, kh, kw)
    cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    want = cols.pow(2).sum(dim=(0, 2)).reshape(conv.in_channels, *conv.kernel_size)
    assert rel_err(got, want) <= 1e-12  # float64 sums in another order


@pytest.mark.parametrize("conv_args", CONVS)
def test_wanda_conv_scores_are_weight_times_column_norm(conv_args: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(**conv_args)).eval()
    conv = model[0]
    x = torch.randn(4, conv.in_channels, 6, 6)
    (scores,) = importance("wanda")(model, ["0"], Context(names=["0"], data=[x])).values()
    cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    g, o = conv.groups, conv.out_channels
    norms = cols.pow(2).sum(dim=(0, 2)).sqrt().reshape(g, -1)  # (groups, C_in / g * kh * kw)
    w = conv.weight.detach().reshape(g, o // g, -1).double()  # (groups, O / g, K)
    want = (w.abs() * norms.unsqueeze(1)).reshape(conv.weight.shape).float()
    assert rel_err(scores, want) <= 1e-6  # float32 result


@SETTINGS
@given(
    k=st.integers(1, 12),
    o=st.integers(1, 6),
    rows=st.integers(1, 40),
    level=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_wanda_equals_magnitude_when_inputs_have_equal_norms(
    k: int, o: int, rows: int, level: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, o)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(o, k, generator=g))
    signs = torch.where(torch.rand(rows, k, generator=g) < 0.5, -1.0, 1.0)
    x = signs * level  # every input column has norm sqrt(rows) * level
    ctx = Context(names=["0"], data=[x[: rows // 2 + 1], x[rows // 2 + 1 :]])
    (scores,) = importance(Criterion.WANDA)(model, ["0"], ctx).values()
    mag = magnitude_scores(model[0].weight)
    assert rel_err(scores, mag.double() * math.sqrt(rows) * level) <= 1e-6
    for sparsity in (0.3, 0.5, 0.8):  # the same order, so the same masks
        assert torch.equal(
            keep_masks([scores], sparsity, Scope.LAYER)[0],
            keep_masks([mag], sparsity, Scope.LAYER)[0],
        )


def test_wanda_conv_without_padding_equals_magnitude_for_sign_inputs() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, groups=1)).eval()
    x = torch.where(torch.rand(2, 2, 5, 5) < 0.5, -1.0, 1.0)  # each patch column: norm sqrt(18)
    (scores,) = importance("wanda")(model, ["0"], Context(names=["0"], data=[x])).values()
    want = magnitude_scores(model[0].weight) * math.sqrt(2 * 9)
    assert rel_err(scores, want) <= 1e-6  # float32 result


def test_wanda_needs_calibration_data() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(DataError, match="wanda importance needs calibration data"):
        importance("wanda")(model, ["0"], Context(names=["0"]))


# -- taylor --------------------------------------------------------------------------------
def hand_taylor(
    w: torch.Tensor, b: torch.Tensor, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per weight and per row: the mean over batches of |W * dL/dW| and |sum_row W * dL/dW|,
    with dL/dW = (softmax(x W^T + b) - onehot(y))^T x / B for the mean cross-entropy."""
    per_weight, per_row = torch.zeros_like(w, dtype=torch.float64), torch.zeros(len(w)).double()
    for x, y in batches:
        x, wd = x.double(), w.double()
        p = torch.softmax(x @ wd.T + b.double(), dim=1)  # (B, O)
        grad = (p - F.one_hot(y, len(w)).double()).T @ x / len(x)  # (O, K)
        per_weight += (wd * grad).abs()
        per_row += (wd * grad).sum(dim=1).abs()
    return per_weight / len(batches), per_row / len(batches)


@settings(SETTINGS, max_examples=12)
@given(
    k=st.integers(1, 5),
    classes=st.integers(2, 5),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    unit=st.sampled_from(Unit),
    seed=st.integers(0, 2**31 - 1),
)
def test_taylor_matches_hand_computed_gradient(
    k: int, classes: int, sizes: list[int], unit: Unit, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, classes))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(classes, k, generator=g))
        model[0].bias.copy_(torch.randn(classes, generator=g))
    task = ToyTask()
    task.batches = [
        (torch.randn(b, k, generator=g), torch.randint(0, classes, (b,), generator=g))
        for b in sizes
    ]
    model.train()  # restored afterwards; the scores are taken in eval mode
    layer = model[0]
    layer.bias.requires_grad_(False)
    crit = importance("taylor", unit)
    assert crit.unit is unit and not crit.normalize
    (scores,) = crit(model, ["0"], Context(names=["0"], task=task)).values()
    want_weight, want_row = hand_taylor(layer.weight.detach(), layer.bias.detach(), task.batches)
    want = want_weight if unit is Unit.WEIGHT else want_row
    assert scores.shape == want.shape
    assert rel_err(scores, want) <= 1e-5  # autograd in float32
    assert model.training and layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.weight.grad is None and layer.bias.grad is None


def test_taylor_scores_each_shared_layer_once_and_sums_batches() -> None:
    model = net()
    task = ToyTask()
    names = unique_names(model, ["conv", "fc1", "fc2"])
    weights = [model.get_submodule(n).weight for n in names]
    one = [taylor_sums(model, weights, [b], Unit.WEIGHT) for b in task.batches]
    both = taylor_sums(model, weights, task.batches, Unit.WEIGHT)
    for i in range(3):
        assert rel_err(both[i], sum(o[i] for o in one)) <= 1e-12
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("task", [None, ToyTask(labelled=False)], ids=["no-task", "unlabelled"])
def test_taylor_without_labelled_data_is_a_data_error(task: ToyTask | None) -> None:
    with pytest.raises(DataError, match="taylor importance needs labelled training data"):
        importance("taylor")(net(), ["fc1"], Context(names=["fc1"], task=task))


def test_taylor_refuses_labels_that_do_not_fit() -> None:
    task = ToyTask()
    task.batches = [(x, y.float()) for x, y in task.batches]
    with pytest.raises(DataError, match=r"train_data\(\)\[0\] is not an \(inputs, class labels\)"):
        importance("taylor")(net(), ["fc1"], Context(names=["fc1"], task=task))
    task = ToyTask()
    task.batches = [(x, y[:-1]) for x, y in task.batches]
    with pytest.raises(DataError, match="do not fit labels"):
        importance("taylor")(net(), ["fc1"], Context(names=["fc1"], task=task))


# -- the factory ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "unit"),
    [
        ("magnitude", Unit.WEIGHT),
        ("wanda", Unit.WEIGHT),
        ("taylor", Unit.WEIGHT),
        ("l1", Unit.CHANNEL),
        ("l2", Unit.CHANNEL),
        ("fpgm", Unit.CHANNEL),
    ],
)
def test_each_criterion_scores_in_its_unit(name: str, unit: Unit) -> None:
    model = net()
    ctx = Context(names=["conv", "fc1"], data=[inputs()], task=ToyTask())
    scores = importance(name)(model, ["conv", "fc1"], ctx)
    for layer in ("conv", "fc1"):
        w = model.get_submodule(layer).weight
        want = tuple(w.shape) if unit is Unit.WEIGHT else (w.shape[0],)
        assert tuple(scores[layer].shape) == want
        assert bool(torch.isfinite(scores[layer]).all() and (scores[layer] >= 0).all())


def test_factory_rejects_a_unit_the_criterion_does_not_have() -> None:
    with pytest.raises(ValueError, match="scores per weight, not per channel"):
        importance("magnitude", "channel")
    with pytest.raises(ValueError):
        importance("nope")
