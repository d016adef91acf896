"""N:M semi-structured pruning: the pattern, its storage and artifacts, and bad settings."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
import slimkit.prune.nm  # registers method "nm"
from slimkit.errors import ConfigError, DataError, RecipeError
from slimkit.formats.sparse import parse_pattern
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.prune.importance import magnitude_scores
from slimkit.prune.nm import NMConfig, nm_keep
from slimkit.recipe import Recipe, shipped_dir
from tests.prune.toys import ToyTask, inputs, net, prune_recipe

LAYERS = ("conv", "fc1", "fc2")
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def nm(n: int = 2, m: int = 4, **options: Any) -> dict[str, Any]:
    return prune_recipe("nm", n=n, m=m, **options)


def groups_of(w: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzero count of every group of ``m`` consecutive weights of each row: (O, K / m)."""
    return (w.reshape(w.shape[0], -1, m) != 0).sum(dim=-1)


# -- the mask ------------------------------------------------------------------------------
@st.composite
def scores_nm(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    rows, groups = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    values = rng.random((rows, groups * m))
    if draw(st.booleans()):
        values = np.round(values * 3)  # many ties
    return torch.from_numpy(values).float(), n, m


@SETTINGS
@given(data=scores_nm())
def test_nm_keep_exactly_n_highest_of_each_group(data: tuple[torch.Tensor, int, int]) -> None:
    scores, n, m = data
    keep = nm_keep(scores, n, m)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    g_keep = keep.reshape(len(scores), -1, m)
    g_scores = scores.reshape(len(scores), -1, m)
    assert bool((g_keep.sum(-1) == n).all())
    kept_min = g_scores.masked_fill(~g_keep, math.inf).amin(-1)
    dropped_max = g_scores.masked_fill(g_keep, -math.inf).amax(-1)
    assert bool((dropped_max <= kept_min).all())


def test_nm_keep_runs_along_flattened_conv_rows() -> None:
    scores = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)
    keep = nm_keep(scores, 1, 4)  # groups: (c0 all taps), (c1 all taps) of each filter
    assert torch.equal(keep.reshape(2, 8), torch.tensor([[0, 0, 0, 1] * 2] * 2).bool())


def test_ties_drop_the_earlier_weight() -> None:
    keep = nm_keep(torch.ones(1, 4), 2, 4)
    assert keep.tolist() == [[False, False, True, True]]


# -- compress ------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 4)])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_every_group_keeps_exactly_n(n: int, m: int, criterion: str) -> None:
    ref = net()
    model = slimkit.compress(copy.deepcopy(ref), nm(n, m, criterion=criterion), [inputs()])
    for name in LAYERS:
        layer = model.get_submodule(name)
        assert type(layer) is (SparseConv2d if name == "conv" else SparseLinear)
        w = layer.dense_weight()
        assert bool((groups_of(w, m) == n).all())
        assert layer.density() == n / m  # sparsity exactly 1 - n / m
        assert layer.pattern == f"{n}:{m}" and layer.spec()["pattern"] == f"{n}:{m}"
        assert f"{n}:{m} semi-structured" in layer.describe()
        kept = w != 0
        assert torch.equal(w[kept], ref.get_submodule(name).weight.detach()[kept])


def test_magnitude_keeps_the_largest_of_each_group() -> None:
    ref = net()
    model = slimkit.compress(copy.deepcopy(ref), nm(2, 4))
    w = ref.fc1.weight.detach()
    want = w * nm_keep(magnitude_scores(w), 2, 4)
    assert torch.equal(model.fc1.dense_weight(), want)


def test_wanda_equals_magnitude_for_inputs_of_equal_norms() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.where(torch.rand(20, 16) < 0.5, -1.0, 1.0)  # every input column: norm sqrt(20)
    a = slimkit.compress(copy.deepcopy(model), nm(criterion="wanda", targets=["0"]), [x])
    b = slimkit.compress(copy.deepcopy(model), nm(targets=["0"]))
    assert torch.equal(a[0].dense_weight(), b[0].dense_weight())


def test_wanda_follows_the_inputs() -> None:
    model = nn.Sequential(nn.Linear(4, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]))
    x = torch.tensor([[0.1, 0.1, 10.0, 10.0]])  # the last two inputs dominate
    out = slimkit.compress(model, nm(criterion="wanda"), [x])
    assert (out[0].dense_weight() != 0).tolist() == [[False, False, True, True]] * 2


def test_kept_zeros_stay_in_the_pattern() -> None:
    model = nn.Sequential(nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight[0, :4] = 0.0  # a whole group of zeros: two of them are still kept
    out = slimkit.compress(model, nm(2, 4))
    layer = out[0]
    assert layer.values.numel() == 8 and layer.n_params() == 8  # 2 of each of 4 groups
    assert torch.equal(layer.dense_weight()[0, :4], torch.zeros(4))


# -- storage and artifacts -------------------------------------------------------------------
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_save_load_round_trip_is_bit_exact(n: int, m: int, tmp_path: Path) -> None:
    model = slimkit.compress(net(), nm(n, m, criterion="wanda"), task=ToyTask())
    slimkit.save(model, tmp_path / "a")
    back = slimkit.load(tmp_path / "a", model=net(seed=9))
    for name in LAYERS:
        a, b = model.get_submodule(name), back.get_submodule(name)
        assert type(b) is type(a) and b.pattern == f"{n}:{m}"
        assert torch.equal(b.values, a.values) and torch.equal(b.mask, a.mask)
        assert torch.equal(b.dense_weight(), a.dense_weight())
    x = inputs()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    manifest = json.loads((tmp_path / "a" / "slimkit.json").read_text())
    specs = {e["name"]: e["spec"] for e in manifest["modules"] if "spec" in e}
    assert {specs[name]["pattern"] for name in LAYERS} == {f"{n}:{m}"}


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_artifact_smaller_than_dense(n: int, m: int, tmp_path: Path) -> None:
    slimkit.save(net(), tmp_path / "dense")
    slimkit.save(slimkit.compress(net(), nm(n, m)), tmp_path / "nm")
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert (tmp_path / "nm" / "model.safetensors").stat().st_size < dense


def test_2to4_artifact_is_about_half_plus_a_bit_per_weight(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(256, 256, bias=False))
    slimkit.save(model, tmp_path / "dense")
    slimkit.save(slimkit.compress(copy.deepcopy(model), nm(2, 4)), tmp_path / "nm")
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    sparse = (tmp_path / "nm" / "model.safetensors").stat().st_size
    # values: half the fp32 weights; mask: 1 bit a weight = 1/32 of them; header: < 1 KiB
    assert sparse <= dense * (0.5 + 1 / 32) + 1024


def test_specs_without_pattern_still_load() -> None:
    dense = nn.Linear(8, 3)
    s = SparseLinear.from_float(dense)
    assert "pattern" not in s.spec() and s.pattern is None  # unstructured specs unchanged
    spec = {"in_features": 8, "out_features": 3, "nnz": 24, "bias": True}
    assert SparseLinear.from_spec(spec).spec() == {**spec, "kernel": "auto"}


def test_layer_refuses_a_mask_off_its_pattern() -> None:
    dense = nn.Linear(8, 2)
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[:, :4] = True  # 4 of the first group, 0 of the second
    with pytest.raises(ValueError, match="does not follow the 2:4 pattern"):
        SparseLinear.from_float(dense, keep, pattern="2:4")
    with pytest.raises(ValueError, match="not 'N:M'"):
        SparseLinear(in_features=8, out_features=2, nnz=8, pattern="4:4")
    assert parse_pattern("2:4") == (2, 4)


# -- bad settings --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"n": 0, "m": 4}, "n"),
        ({"n": 4, "m": 4}, "n"),
        ({"n": 5, "m": 4}, "n"),
        ({"n": 1, "m": 1}, "m"),
        ({"n": 1, "m": 0}, "m"),
        ({"criterion": "taylor"}, "criterion"),
    ],
)
def test_bad_settings_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"prune.nm.{field}: got"):
        NMConfig(**options)
    model = net()
    with pytest.raises(RecipeError, match=f"prune.nm.{field}: got"):
        slimkit.compress(model, prune_recipe("nm", **options))
    assert type(model.fc1) is nn.Linear


def test_m_not_dividing_names_every_layer_before_any_work() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.Linear(6, 2)
    )
    ref = copy.deepcopy(model)
    # m=4: conv rows are 1*3*3 = 9 long, the last linear's 6; wanda needs data it was not given,
    # so the ConfigError (not a DataError) shows the check runs first
    with pytest.raises(ConfigError, match=r"m=4 does not divide .* 2 layer\(s\): 0 \(9\), 3 \(6\)"):
        slimkit.compress(model, nm(2, 4, criterion="wanda"))
    assert [type(m) for m in model] == [type(m) for m in ref]
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    with pytest.raises(DataError):  # with those layers ignored the stage goes on to want data
        slimkit.compress(model, nm(2, 4, criterion="wanda", ignore=["0", "3"]))


def test_grouped_conv_rows_are_per_group() -> None:
    model = nn.Sequential(nn.Conv2d(8, 4, 1, groups=2)).eval()  # rows of 8 / 2 * 1 * 1 = 4
    out = slimkit.compress(model, nm(2, 4))
    assert bool((groups_of(out[0].dense_weight(), 4) == 2).all())
    with pytest.raises(ConfigError, match=r"0 \(4\)"):
        slimkit.compress(nn.Sequential(nn.Conv2d(8, 4, 1, groups=2)), nm(4, 8))


def test_shared_layer_pruned_once_and_kept_shared() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    out = slimkit.compress(model, nm(2, 4, criterion="wanda"), [torch.randn(3, 8)])
    assert out[0] is out[2] and type(out[0]) is SparseLinear
    assert bool((groups_of(out[0].dense_weight(), 4) == 2).all())


# -- the shipped recipe --------------------------------------------------------------------
def test_shipped_2to4_wanda_recipe() -> None:
    r = Recipe.from_file(shipped_dir() / "2to4-wanda.yaml")
    assert r.name == "2to4-wanda"
    assert r.stages == (NMConfig(n=2, m=4, criterion="wanda"),)  # type: ignore[arg-type]
    assert Recipe.from_dict(r.to_dict()) == r
    model = slimkit.compress(net(), shipped_dir() / "2to4-wanda.yaml", task=ToyTask())
    assert {model.get_submodule(n).density() for n in LAYERS} == {0.5}
