"""Magnitude pruning: masks, scopes, sparse storage and its outputs."""

import copy
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit.compressed import count_params, module_class
from slimkit.config import Scope
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.prune.magnitude import MagnitudeConfig, magnitude_masks


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def prune_recipe(**options: Any) -> dict[str, Any]:
    return {"name": "p", "stages": [{"prune": {"method": "magnitude", **options}}]}


def distinct(shape: tuple[int, ...], offset: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """A tensor of distinct magnitudes in random order with random signs."""
    n = int(torch.Size(shape).numel())
    mags = (torch.arange(1, n + 1, dtype=torch.float32) + offset) * scale
    signs = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    return (mags * signs)[torch.randperm(n)].reshape(shape)


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(7, 13), (4, 3, 3, 3), (1, 1)])
def test_layer_scope_prunes_exact_fraction_of_smallest(
    sparsity: float, shape: tuple[int, ...]
) -> None:
    w = distinct(shape)
    (keep,) = magnitude_masks([w], sparsity, Scope.LAYER)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    n = w.numel()
    assert int((~keep).sum()) == round(sparsity * n)
    if keep.any() and (~keep).any():
        assert float(w[~keep].abs().max()) < float(w[keep].abs().min())


def test_layer_scope_is_per_layer() -> None:
    big, small = distinct((10, 10), scale=100.0), distinct((8, 5), scale=0.01)
    kb, ks = magnitude_masks([big, small], 0.5, Scope.LAYER)
    assert int((~kb).sum()) == 50
    assert int((~ks).sum()) == 20


def test_global_scope_prunes_fraction_of_all_and_smaller_layer_more() -> None:
    big = distinct((10, 10), offset=40.0)  # magnitudes 41..140
    small = distinct((10, 10))  # magnitudes 1..100
    kb, ks = magnitude_masks([big, small], 0.5, Scope.GLOBAL)
    assert int((~kb).sum()) + int((~ks).sum()) == 100
    assert int((~ks).sum()) > int((~kb).sum())
    # exactly the 100 smallest magnitudes of the union are gone
    assert float(big[~kb].abs().max()) < float(small[ks].abs().min())
    assert int((~kb).sum()) == 30  # 41..70 from big, 1..70 from small


def test_global_scope_with_disjoint_magnitudes_prunes_only_small_layer() -> None:
    big = distinct((6, 6), scale=1000.0)
    small = distinct((6, 6), scale=1e-3)
    kb, ks = magnitude_masks([big, small], 0.5, Scope.GLOBAL)
    assert bool(kb.all())
    assert not bool(ks.any())


@pytest.mark.parametrize("scope", [Scope.LAYER, Scope.GLOBAL])
def test_sparsity_zero_keeps_all(scope: Scope) -> None:
    w = torch.randn(5, 5)
    w[0, 0] = 0.0
    (keep,) = magnitude_masks([w], 0.0, scope)
    assert bool(keep.all())


def test_existing_zeros_are_pruned_first() -> None:
    w = distinct((4, 5))
    w[:2] = 0.0  # 10 zeros
    (keep,) = magnitude_masks([w], 0.25, Scope.LAYER)  # 5 to prune: all among the zeros
    assert bool(keep[2:].all())
    assert int((~keep).sum()) == 5  # exactly the asked fraction, all among the zeros


def test_ties_do_not_prune_more_than_asked() -> None:
    w = torch.full((4, 4), 0.5)
    (keep,) = magnitude_masks([w], 0.5, Scope.LAYER)
    assert int(keep.sum()) == 8


# -- sparse layers -------------------------------------------------------------------------
def masked_linear(m: nn.Linear, sparsity: float) -> nn.Linear:
    dense = copy.deepcopy(m)
    (keep,) = magnitude_masks([dense.weight], sparsity, Scope.LAYER)
    with torch.no_grad():
        dense.weight.mul_(keep)
    return dense


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_masked_dense(sparsity: float, bias: bool) -> None:
    dense = masked_linear(nn.Linear(12, 5, bias=bias), sparsity)
    s = SparseLinear.from_float(dense)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(s(x), dense(x))
    nnz = int((dense.weight != 0).sum())
    assert s.n_params() == nnz == s.values.numel()
    assert s.density() == pytest.approx(nnz / 60)
    assert s.mask.dtype == torch.uint8 and s.mask.numel() == (60 + 7) // 8
    assert torch.equal(s.dense_weight(), dense.weight.detach())
    assert (s.bias is None) == (not bias)


CONVS = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
    dict(in_channels=2, out_channels=2, kernel_size=(2, 3), dilation=2, bias=False),
]


@pytest.mark.parametrize("conv_args", CONVS)
def test_sparse_conv_equals_masked_dense(conv_args: dict[str, Any]) -> None:
    dense = nn.Conv2d(**conv_args)
    (keep,) = magnitude_masks([dense.weight], 0.6, Scope.LAYER)
    with torch.no_grad():
        dense.weight.mul_(keep)
    s = SparseConv2d.from_float(dense)
    x = torch.randn(2, dense.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(s(x), dense(x))
    assert s.n_params() == int(keep.sum())
    assert s.density() == pytest.approx(float(keep.float().mean()))


@pytest.mark.parametrize("conv_args", CONVS)
def test_sparse_conv_spec_round_trip(conv_args: dict[str, Any]) -> None:
    dense = nn.Conv2d(**conv_args)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) < 0.5)
    s = SparseConv2d.from_float(dense)
    fresh = module_class("SparseConv2d").from_spec(s.spec())  # type: ignore[union-attr]
    fresh.load_state_dict(s.state_dict())
    x = torch.randn(1, dense.in_channels, 6, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x), s(x))


def test_sparse_linear_spec_round_trip() -> None:
    dense = masked_linear(nn.Linear(6, 4), 0.5)
    s = SparseLinear.from_float(dense)
    fresh = SparseLinear.from_spec(s.spec())
    assert fresh.spec() == s.spec()
    fresh.load_state_dict(s.state_dict())
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x), dense(x))
    assert "dense" not in s.state_dict()  # the cache is never saved


def test_load_state_dict_resets_dense_cache() -> None:
    a = masked_linear(nn.Linear(6, 4), 0.5)
    b = masked_linear(nn.Linear(6, 4), 0.5)
    sa, sb = SparseLinear.from_float(a), SparseLinear.from_float(b)
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(sa(x), a(x))  # caches a's dense weight
        sa.load_state_dict(sb.state_dict())
        assert torch.equal(sa(x), b(x))


def test_sparse_all_zero_layer() -> None:
    dense = nn.Linear(3, 2)
    with torch.no_grad():
        dense.weight.zero_()
    s = SparseLinear.from_float(dense)
    assert s.n_params() == 0 and s.density() == 0.0
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(s(x), dense(x))


# -- compress with magnitude ---------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)
        self.emb = nn.Embedding(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.conv(x).mean((2, 3)))))


def test_compress_prune_layer_scope() -> None:
    model = Net().eval()
    ref = copy.deepcopy(model)
    slimkit.compress(model, prune_recipe(sparsity=0.5))
    assert type(model.conv) is SparseConv2d
    assert type(model.fc1) is SparseLinear and type(model.fc2) is SparseLinear
    assert type(model.emb) is nn.Embedding  # not a magnitude target type
    for name in ("conv", "fc1", "fc2"):
        layer = getattr(model, name)
        n = getattr(ref, name).weight.numel()
        assert layer.n_params() == n - round(0.5 * n)
    # the model computes with exactly the masked weights of the original
    masked = copy.deepcopy(ref)
    for name in ("conv", "fc1", "fc2"):
        (keep,) = magnitude_masks([getattr(ref, name).weight], 0.5, Scope.LAYER)
        with torch.no_grad():
            getattr(masked, name).weight.mul_(keep)
    x = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        assert torch.equal(model(x), masked(x))
    assert count_params(model) == count_params(ref) - sum(
        round(0.5 * getattr(ref, n).weight.numel()) for n in ("conv", "fc1", "fc2")
    )


def test_compress_prune_global_scope_hits_small_layer_more() -> None:
    model = Net().eval()
    with torch.no_grad():
        model.fc2.weight.mul_(1e-3)
    slimkit.compress(model, prune_recipe(sparsity=0.5, scope="global", targets=["fc*"]))
    assert type(model.conv) is nn.Conv2d
    d1, d2 = model.fc1.density(), model.fc2.density()
    assert d2 < d1
    total = model.fc1.values.numel() + model.fc2.values.numel()
    assert total == 64 + 48 - round(0.5 * (64 + 48))


def test_compress_prune_respects_ignore() -> None:
    model = Net().eval()
    ref = copy.deepcopy(model)
    slimkit.compress(model, prune_recipe(sparsity=0.9, ignore=["fc2", "re:c.nv"]))
    assert type(model.fc1) is SparseLinear
    assert type(model.fc2) is nn.Linear and torch.equal(model.fc2.weight, ref.fc2.weight)
    assert type(model.conv) is nn.Conv2d and torch.equal(model.conv.weight, ref.conv.weight)


def test_compress_prune_zero_sparsity_keeps_outputs() -> None:
    model = Net().eval()
    ref = copy.deepcopy(model)
    slimkit.compress(model, prune_recipe(sparsity=0.0))
    assert type(model.fc1) is SparseLinear and model.fc1.density() == 1.0
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_magnitude_config_in_recipe_matches_defaults() -> None:
    rec = slimkit.Recipe.from_dict(prune_recipe())
    assert rec.stages == (MagnitudeConfig(),)
