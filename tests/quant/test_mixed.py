"""Mixed precision: exact allocation, sensitivity measurements, the handler and its checks."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.config import Granularity
from slimkit.context import Context
from slimkit.errors import ConfigError, DataError
from slimkit.formats.primitives import fake_quantize
from slimkit.layers.quantized import QuantEmbedding, QuantLinear
from slimkit.quant import mixed as M
from slimkit.recipe import Recipe, shipped_dir

QUANT: dict[str, Any] = {"symmetric": False, "per_channel": True, "group_size": 8}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def stage(**options: Any) -> dict[str, Any]:
    base = {"method": "mixed", "quantizer": "rtn", "granularity": "per_group", "group_size": 8}
    return {"name": "mixed-test", "stages": [{"quantize": {**base, **options}}]}


def total_cost(costs: np.ndarray, widths: list[int], chosen: list[int]) -> float:
    return float(sum(costs[layer, widths.index(b)] for layer, b in enumerate(chosen)))


def brute_force(
    costs: np.ndarray, sizes: list[int], widths: list[int], avg: float, slack: float = 0.0
) -> float:
    """Least total cost over every assignment within the budget less ``slack`` bits."""
    budget = avg * sum(sizes) - slack
    best = float("inf")
    for pick in itertools.product(range(len(widths)), repeat=len(sizes)):
        if sum(n * widths[j] for n, j in zip(sizes, pick, strict=True)) <= budget + 1e-9:
            best = min(best, float(sum(costs[i, j] for i, j in enumerate(pick))))
    return best


def random_instance(rng: np.random.Generator) -> tuple[np.ndarray, list[int], list[int], float]:
    n_layers = int(rng.integers(1, 6))
    widths = sorted(rng.choice(np.arange(2, 9), size=int(rng.integers(1, 5)), replace=False))
    widths = [int(b) for b in widths]
    sizes = [int(n) for n in np.asarray(rng.integers(1, 40, size=n_layers))]
    # decreasing in bits as real costs are, but with layer-specific, uneven steps
    steps = rng.exponential(1.0, size=(n_layers, len(widths))) * rng.exponential(
        3.0, size=(n_layers, 1)
    )
    costs = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]  # (L, B)
    avg = float(rng.uniform(widths[0], widths[-1]))
    return costs, sizes, widths, avg


class Net(nn.Module):
    """Two parallel layers of the same shape: ``loud`` reaches the output 10^4 times
    stronger than ``quiet``."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Linear(16, 16)
        self.quiet = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * self.loud(x) + 0.01 * self.quiet(x)


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)
    )


class Counting(nn.Module):
    """Wraps a model and counts its forwards."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)  # type: ignore[no-any-return]


# -- config ----------------------------------------------------------------------------------
def test_defaults_and_shipped_recipe() -> None:
    cfg = M.MixedConfig()
    assert (cfg.avg_bits, cfg.candidates, cfg.quantizer) == (4.5, (3, 4, 5, 6, 8), "gptq")
    rec = Recipe.from_file(shipped_dir() / "mixed-4.5bit.yaml")
    (mixed,) = rec.stages
    assert isinstance(mixed, M.MixedConfig)
    assert (mixed.avg_bits, mixed.group_size, mixed.symmetric, mixed.quantizer) == (
        4.5,
        64,
        False,
        "gptq",
    )
    assert mixed.targets == ("*",)
    assert Recipe.from_dict(rec.to_dict()).stages == rec.stages


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"avg_bits": 2.5}, "avg_bits"),
        ({"avg_bits": 8.5}, "avg_bits"),
        ({"candidates": [4, 6], "avg_bits": 3.0}, "avg_bits"),
        ({"candidates": [3, 9]}, "candidates"),
        ({"candidates": [1, 4]}, "candidates"),
        ({"candidates": []}, "candidates"),
        ({"candidates": [4, 4, 5]}, "candidates"),
        ({"quantizer": "awq"}, "quantizer"),
        ({"bits": 4}, "bits"),
        ({"probe_batches": 0}, "probe_batches"),
        ({"probe_bits": 9}, "probe_bits"),
        ({"damp": 0.0}, "damp"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"quantize\.mixed\.{field}: got"):
        M.MixedConfig(**options)


def test_avg_bits_at_the_ends_is_allowed() -> None:
    assert M.MixedConfig(avg_bits=3).avg_bits == 3.0
    assert M.MixedConfig(avg_bits=8.0).avg_bits == 8.0


# -- allocation ------------------------------------------------------------------------------
def test_allocation_is_optimal_on_random_instances() -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        costs, sizes, widths, avg = random_instance(rng)
        chosen = M.allocate(costs, sizes, widths, avg)
        assert all(b in widths for b in chosen)
        assert sum(n * b for n, b in zip(sizes, chosen, strict=True)) <= avg * sum(sizes) + 1e-9
        best = brute_force(costs, sizes, widths, avg)
        assert total_cost(costs, widths, chosen) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_allocation_is_optimal_for_costs_in_any_order() -> None:
    """Costs that are not monotone in bits, widths given unsorted."""
    rng = np.random.default_rng(1)
    for _ in range(100):
        costs, sizes, widths, avg = random_instance(rng)
        costs = rng.permuted(costs, axis=1)
        order = rng.permutation(len(widths))
        shuffled = [widths[j] for j in order]
        chosen = M.allocate(costs[:, order], sizes, shuffled, avg)
        best = brute_force(costs, sizes, widths, avg)
        assert total_cost(costs, widths, chosen) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_more_budget_is_never_worse() -> None:
    rng = np.random.default_rng(2)
    for _ in range(40):
        costs, sizes, widths, _ = random_instance(rng)
        budgets = np.linspace(widths[0], widths[-1], 9)
        spent = [total_cost(costs, widths, M.allocate(costs, sizes, widths, a)) for a in budgets]
        assert all(b <= a + 1e-12 for a, b in itertools.pairwise(spent))


def test_budget_ends() -> None:
    costs = np.array([[4.0, 2.0, 1.0], [9.0, 3.0, 0.5]])
    assert M.allocate(costs, [10, 30], [3, 4, 8], 3.0) == [3, 3]
    assert M.allocate(costs, [10, 30], [3, 4, 8], 8.0) == [8, 8]
    # 4.0 bits on average: only the bigger, more sensitive layer can afford 4 bits
    assert M.allocate(costs, [10, 30], [3, 4, 8], 3.75) == [3, 4]
    assert M.allocate(np.zeros((0, 3)), [], [3, 4, 8], 4.0) == []


def test_coarse_units_keep_the_budget() -> None:
    """Sizes whose extras need more units than allowed are rounded up: never over budget,
    and at least as good as the brute-force optimum of the budget less L + 1 units."""
    rng = np.random.default_rng(3)
    compared = 0
    for _ in range(100):
        costs, _, widths, avg = random_instance(rng)
        sizes = [int(n) for n in np.asarray(rng.integers(10_000, 1_000_000, costs.shape[0]))]
        chosen = M.allocate(costs, sizes, widths, avg, max_units=50)
        assert sum(n * b for n, b in zip(sizes, chosen, strict=True)) <= avg * sum(sizes)
        unit = -(-sum(sizes) * (widths[-1] - widths[0]) // 50)
        slack = (len(sizes) + 1) * unit
        if slack <= (avg - widths[0]) * sum(sizes):
            best = brute_force(costs, sizes, widths, avg, slack)
            assert total_cost(costs, widths, chosen) <= best + 1e-12
            compared += 1
        assert total_cost(costs, widths, chosen) <= costs[:, 0].sum() + 1e-12
    assert compared >= 20


def test_allocate_refuses_a_budget_outside_the_widths() -> None:
    with pytest.raises(ValueError, match="avg_bits 9"):
        M.allocate(np.ones((1, 2)), [4], [4, 8], 9.0)


# -- sensitivity -----------------------------------------------------------------------------
def test_proxy_grows_with_fewer_bits() -> None:
    w = torch.randn(24, 32)
    x = torch.randn(200, 32) * torch.linspace(0.1, 3.0, 32)  # uneven input channels
    h = x.T @ x / x.shape[0]  # (K, K)
    for hess in (h, None):
        errors = [M.proxy_error(w, hess, b, QUANT) for b in range(2, 9)]
        assert all(a > 1.5 * b for a, b in itertools.pairwise(errors))  # each bit ~4x
        assert errors[-1] > 0


def test_proxy_is_the_mean_output_error() -> None:
    """tr(E H E^T) with H = X^T X / n is the mean squared output error over the rows of X."""
    w = torch.randn(8, 16)
    x = torch.randn(50, 16)
    err = w - fake_quantize(w, 3, **QUANT)
    expected = float(((x @ err.T) ** 2).sum(dim=1).mean())
    assert M.proxy_error(w, x.T @ x / 50, 3, QUANT) == pytest.approx(expected, rel=1e-4)
    assert M.proxy_error(w, None, 3, QUANT) == pytest.approx(float((err**2).sum()), rel=1e-5)


def test_weighted_costs_match_the_probe() -> None:
    proxies = np.array([[8.0, 2.0, 0.5], [4.0, 1.0, 0.25], [0.0, 0.0, 0.0]])
    costs = M.weighted_costs(proxies, np.array([1.0, 100.0, 3.0]), 0)
    np.testing.assert_allclose(costs[:, 0], [1.0, 100.0, 0.0])
    np.testing.assert_allclose(costs[1], [100.0, 25.0, 6.25])  # ratios of the proxies kept


def test_hessians_skip_padding_and_share_inputs() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.q(x) + self.k(x)

    model = Masked()
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layers = dict(model.named_children())
    hs, refs = M.second_moments(model, layers, [{"x": x, "attention_mask": mask}], 1)
    real = x[mask.bool()]  # (8, 6)
    assert torch.allclose(hs["q"], real.T @ real / 8, atol=1e-6)
    assert hs["q"] is not hs["k"]
    assert torch.equal(hs["k"], hs["q"])
    assert refs[0].shape == (8, 4)  # the reference output holds the real tokens only


def test_conv_hessian_gives_the_output_error() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=False)
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 8, 8)
    hs, _ = M.second_moments(model, {"0": conv}, [x], 0)
    assert hs["0"].shape == (27, 27)
    err = conv.weight.detach() - fake_quantize(conv.weight.detach(), 3, False, True, None)
    out = F.conv2d(x, err, stride=2, padding=1)  # (2, 4, 4, 4)
    expected = float((out**2).sum() / (2 * 4 * 4))  # mean over output positions
    proxy = M.proxy_error(conv.weight, hs["0"], 3, {"symmetric": False, "per_channel": True})
    assert proxy == pytest.approx(expected, rel=1e-4)


def test_sensitivity_falls_with_bits_and_leaves_the_model_as_it_was() -> None:
    model = mlp().train()
    before = copy.deepcopy(model.state_dict())
    data = [torch.randn(8, 16) for _ in range(3)]
    cfg = M.MixedConfig(quantizer="rtn", granularity=Granularity.PER_GROUP, group_size=8)
    layers: dict[str, nn.Module] = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    with torch.no_grad():
        costs = M.sensitivity(model, layers, data, cfg, Context(names=list(layers)))
    assert costs.shape == (3, 5)
    assert bool((costs[:, :-1] > costs[:, 1:]).all())
    assert bool((costs[:, -1] > 0).all())
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_loud_layer_gets_more_bits() -> None:
    model = Net()
    with torch.no_grad():
        model.quiet.weight.copy_(model.loud.weight.flip(0))  # the same weight statistics
    data = [torch.randn(16, 16) for _ in range(2)]
    seen: list[str] = []
    recipe = stage(candidates=[3, 4, 5, 6], avg_bits=4.5)
    q = slimkit.compress(model, recipe, data=data, progress=seen.append)
    assert isinstance(q.loud, QuantLinear) and isinstance(q.quiet, QuantLinear)
    assert (q.loud.bits, q.quiet.bits) == (6, 3)
    assert q.loud.spec()["bits"] == 6
    assert any("6 bits: loud" in line for line in seen)
    assert any("3 bits: quiet" in line for line in seen)


# -- handler ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:layer .* calibration rows for")
@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_compress_respects_the_budget(quantizer: str) -> None:
    model = mlp()
    reference = copy.deepcopy(model)
    data = [torch.randn(8, 16) for _ in range(3)]
    q = slimkit.compress(model, stage(quantizer=quantizer, avg_bits=4.5), data=data)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 3
    assert all(m.bits in (3, 4, 5, 6, 8) for m in layers)
    sizes = [m.n_params() for m in layers]
    assert sum(n * m.bits for n, m in zip(sizes, layers, strict=True)) <= 4.5 * sum(sizes)
    assert len({m.bits for m in layers}) > 1
    x = torch.randn(32, 16)
    with torch.no_grad():
        y, yq = reference(x), q(x)
    assert float((yq - y).pow(2).mean()) < 0.01 * float(y.pow(2).mean())


def test_embeddings_use_the_weight_proxy() -> None:
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8))
    data = [torch.randint(0, 50, (4, 6)) for _ in range(2)]
    assert slimkit.compress(model, stage(avg_bits=5.0), data=data) is model
    emb, lin = model[0], model[1]
    assert isinstance(emb, QuantEmbedding) and isinstance(lin, QuantLinear)
    total = 50 * 16 + 16 * 8
    assert 50 * 16 * emb.bits + 16 * 8 * lin.bits <= 5.0 * total


def test_empty_data_raises_before_any_work() -> None:
    model = Counting(mlp())
    before = copy.deepcopy(model.state_dict())
    names = ["inner.0", "inner.2", "inner.4"]
    cfg = M.MixedConfig(quantizer="rtn")
    for ctx in (Context(names=names, data=[]), Context(names=names)):
        with pytest.raises(DataError, match="mixed needs calibration data"):
            M.apply_mixed(model, cfg, ctx)
    assert model.calls == 0
    assert all(type(m) is not QuantLinear for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_group_size_not_dividing_gives_short_last_groups() -> None:
    model = Counting(nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 10), nn.Linear(10, 4)))
    data = [torch.randn(4, 16)]
    q = slimkit.compress(model, stage(group_size=8), data=data)
    layers = list(q.inner.children())
    assert all(isinstance(m, QuantLinear) for m in layers)
    # 16 inputs: 2 groups of 8; 12: groups of 8 and 4; 10: groups of 8 and 2
    assert [tuple(m.scale.shape) for m in layers] == [(12, 2), (10, 2), (4, 2)]
