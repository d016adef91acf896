"""The factorize stage (factorize/stage.py): real smaller layers, rank rules, skips, errors,
artifacts and the shipped recipes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
import slimkit.factorize.stage  # registers the factorize methods
from slimkit.compressed import count_params
from slimkit.errors import ConfigError, DataError
from slimkit.evaluate.macs import count_macs
from slimkit.factorize import lowrank
from slimkit.factorize.stage import (
    LowRankLinear,
    SpatialConv2d,
    SpatialSVDConfig,
    SVDConfig,
    TuckerConfig,
    TuckerConv2d,
)
from slimkit.recipe import Recipe, shipped_dir
from slimkit.tasks.digits import LeNet5
from slimkit.tasks.resnet import MiniResNet

ATOL = 1e-5


class MLP(nn.Module):
    """(B, 16) -> (B, 8): fc1 16 -> 32, fc2 32 -> 8."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


class ConvNet(nn.Module):
    """(B, 8, 9, 9) -> (B, 4): a strided 3x3 conv, a grouped conv, a 3x3 conv, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv2 = nn.Conv2d(16, 12, 3, padding=1, bias=False)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))  # (B, 16, 5, 5)
        h = torch.relu(self.conv2(torch.relu(self.grouped(h))))  # (B, 12, 5, 5)
        return self.head(h.mean(dim=(2, 3)))  # type: ignore[no-any-return]


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def x_mlp(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(1))


def x_conv(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 8, 9, 9, generator=torch.Generator().manual_seed(2))


def recipe(method: str, **options: Any) -> dict[str, Any]:
    return {"name": "f", "stages": [{"factorize": {"method": method, **options}}]}


def compress(model: nn.Module, method: str, data: Any = None, **options: Any) -> list[str]:
    messages: list[str] = []
    slimkit.compress(model, recipe(method, **options), data=data, progress=messages.append)
    return messages


# -- exactness at full rank ------------------------------------------------------------------
def test_low_rank_linear_at_full_rank_reproduces_the_layer() -> None:
    m = mlp().fc1
    low = LowRankLinear.from_linear(m, 16)
    with torch.no_grad():
        torch.testing.assert_close(low(x_mlp()), m(x_mlp()), atol=ATOL, rtol=0)


def test_tucker_at_full_rank_reproduces_the_output() -> None:
    m = convnet().conv1
    t = TuckerConv2d.from_conv(m, 8, 16, iters=2)
    with torch.no_grad():
        torch.testing.assert_close(t(x_conv()), m(x_conv()), atol=ATOL, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_spatial_svd_at_full_rank_with_stride_2_and_padding_1(bias: bool) -> None:
    torch.manual_seed(3)
    m = nn.Conv2d(8, 6, (3, 3), stride=2, padding=1, bias=bias).eval()
    s = SpatialConv2d.from_conv(m, min(8 * 3, 6 * 3))
    x = torch.randn(2, 8, 10, 11)  # odd width: the output sizes must still agree
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(s.dense_weight(), m.weight, atol=ATOL, rtol=0)


def test_spatial_svd_splits_unequal_stride_padding_dilation() -> None:
    torch.manual_seed(4)
    m = nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).eval()
    s = SpatialConv2d.from_conv(m, min(3 * 3, 4 * 5))
    assert s.vertical.stride == (2, 1) and s.horizontal.stride == (1, 1)
    assert s.vertical.padding == (1, 0) and s.horizontal.padding == (0, 2)
    x = torch.randn(2, 3, 9, 12)
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x), atol=ATOL, rtol=0)


# -- the stage: smaller, skips, rank rules ---------------------------------------------------
def test_svd_ratio_shrinks_params_and_macs_within_the_budget() -> None:
    ref, model = mlp(), mlp()
    compress(model, "svd", ratio=0.5)
    for name, (inp, out) in {"fc1": (16, 32), "fc2": (32, 8)}.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        assert layer.rank * (inp + out) <= 0.5 * inp * out
        assert "rank" in layer.describe()
    assert count_params(model) < count_params(ref)
    assert count_macs(model, x_mlp()) < count_macs(ref, x_mlp())
    w = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert count_params(model) == w + 32 + 8  # children counted once, biases kept


def test_svd_energy_rank_is_the_minimal_one() -> None:
    model = mlp()
    s = torch.linalg.svdvals(model.fc1.weight.detach().double())
    compress(model, "svd", energy=0.6, targets=["fc1"])
    assert model.fc1.rank == lowrank.energy_rank(s, 0.6)  # type: ignore[union-attr]


def test_layer_that_would_not_shrink_is_skipped_and_reported() -> None:
    model = mlp()
    before = copy.deepcopy(model.fc2)
    messages = compress(model, "svd", rank=8)  # fc2: 8 * (32 + 8) = 320 >= 256 weights
    assert isinstance(model.fc1, LowRankLinear)
    assert type(model.fc2) is nn.Linear and torch.equal(model.fc2.weight, before.weight)
    assert any("fc2" in m and "would not shrink" in m for m in messages)


def test_rank_too_large_names_the_layer_before_any_change() -> None:
    model, ref = mlp(), mlp()
    with pytest.raises(ConfigError, match=r"rank.*'fc2'.*at most rank 8"):
        compress(model, "svd", rank=10)
    assert type(model.fc1) is nn.Linear and torch.equal(model.fc1.weight, ref.fc1.weight)


def test_shared_layer_stays_shared() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    model.append(model[0])
    compress(model, "svd", ratio=0.4)
    assert isinstance(model[0], LowRankLinear) and model[2] is model[0]


def test_sensitivity_allocation_spends_the_total_budget_on_measured_errors() -> None:
    model, ref = mlp(), mlp()
    compress(model, "svd", data=[x_mlp(32)], ratio=0.5, allocate="sensitivity")
    ranks = {n: model.get_submodule(n).rank for n in ("fc1", "fc2")}  # type: ignore[union-attr]
    held = ranks["fc1"] * 48 + ranks["fc2"] * 40
    assert held <= 0.5 * (16 * 32 + 32 * 8)
    assert held > 0.5 * (16 * 32 + 32 * 8) - 48  # no further rank fits
    assert count_params(model) < count_params(ref)
    with pytest.raises(DataError, match="calibration data"):
        compress(mlp(), "svd", ratio=0.5, allocate="sensitivity")


def test_tucker_ratio_shrinks_params_and_macs_and_skips_grouped_conv() -> None:
    ref, model = convnet(), convnet()
    messages = compress(model, "tucker", ratio=0.5)
    for name in ("conv1", "conv2"):
        layer = model.get_submodule(name)
        assert isinstance(layer, TuckerConv2d)
        assert "ranks in" in layer.describe()
        w = sum(p.numel() for n, p in layer.named_parameters() if n.endswith("weight"))
        assert w <= 0.5 * layer.dense_params()
    assert type(model.grouped) is nn.Conv2d
    assert any("grouped" in m and "groups=4" in m for m in messages)
    assert count_params(model) < count_params(ref)
    assert count_macs(model, x_conv()) < count_macs(ref, x_conv())


def test_tucker_energy_one_would_not_shrink_and_is_skipped() -> None:
    model = convnet()
    messages = compress(model, "tucker", energy=1.0, targets=["conv1"])
    assert type(model.conv1) is nn.Conv2d
    assert any("conv1" in m and "would not shrink" in m for m in messages)


def test_spatial_svd_ratio_shrinks_and_skips_grouped_conv() -> None:
    ref, model = convnet(), convnet()
    messages = compress(model, "spatial-svd", ratio=0.5)
    assert isinstance(model.conv1, SpatialConv2d) and isinstance(model.conv2, SpatialConv2d)
    assert model.conv1.rank * (8 * 3 + 16 * 3) <= 0.5 * 8 * 16 * 9
    assert any("grouped" in m for m in messages)
    assert count_params(model) < count_params(ref)
    assert count_macs(model, x_conv()) < count_macs(ref, x_conv())
    assert model(x_conv()).shape == (4, 4)


# -- artifacts -------------------------------------------------------------------------------
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "svd": ("svd", {"ratio": 0.5}),
    "tucker": ("tucker", {"ratio": 0.5, "iters": 1}),
    "spatial-svd": ("spatial-svd", {"energy": 0.7}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip_is_bit_exact(case: str, tmp_path: Path) -> None:
    method, options = CASES[case]
    make, x = (mlp, x_mlp()) if method == "svd" else (convnet, x_conv())
    model = make()
    compress(model, method, **options)
    slimkit.save(model, tmp_path / "a")
    loaded = slimkit.load(tmp_path / "a", model=make(seed=9))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert count_params(loaded) == count_params(model)
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert kinds & {"LowRankLinear", "TuckerConv2d", "SpatialConv2d"}


# -- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "options", "field"),
    [
        (SVDConfig, {"energy": 1.5}, "factorize.svd.energy"),
        (SVDConfig, {"energy": 0.0}, "factorize.svd.energy"),
        (SVDConfig, {"ratio": 1.0}, "factorize.svd.ratio"),
        (SVDConfig, {"energy": 0.9, "ratio": 0.5}, "factorize.svd.ratio"),
        (SVDConfig, {"ratio": 0.5, "rank": 4}, "factorize.svd.rank"),
        (SVDConfig, {"rank": 0}, "factorize.svd.rank"),
        (SVDConfig, {"energy": 0.9, "allocate": "sensitivity"}, "factorize.svd.allocate"),
        (SVDConfig, {"allocate": "greedy"}, "factorize.svd.allocate"),
        (TuckerConfig, {"iters": -1}, "factorize.tucker.iters"),
        (TuckerConfig, {"ratio": -0.5}, "factorize.tucker.ratio"),
        (SpatialSVDConfig, {"energy": "high"}, "factorize.spatial-svd.energy"),
    ],
)
def test_bad_options_name_the_field(cls: type, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cls(**options)


def test_unknown_key_and_default_ratio() -> None:
    with pytest.raises(ConfigError, match="unknown key 'rnak'"):
        Recipe.from_dict(recipe("svd", rnak=3))
    assert SVDConfig().ratio == 0.5 and TuckerConfig(energy=0.9).ratio is None


# -- shipped recipes -------------------------------------------------------------------------
def test_shipped_recipes_parse() -> None:
    (svd,) = Recipe.from_file(shipped_dir() / "svd-50.yaml").stages
    assert isinstance(svd, SVDConfig) and svd.ratio == 0.5
    (tucker,) = Recipe.from_file(shipped_dir() / "tucker.yaml").stages
    assert isinstance(tucker, TuckerConfig) and tucker.ratio == 0.5


def test_svd_50_selects_the_ffn_of_a_bert_encoder_only() -> None:
    from slimkit.select import select

    (svd,) = Recipe.from_file(shipped_dir() / "svd-50.yaml").stages
    assert isinstance(svd, SVDConfig)
    names = {
        f"encoder.layer.{i}.{part}": nn.Linear(2, 2)
        for i in range(2)
        for part in ("intermediate.dense", "output.dense", "attention.output.dense")
    }
    model = nn.Module()
    for name, layer in names.items():
        parent = model
        *path, leaf = name.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(leaf, layer)
    chosen = select(model, svd.targets, svd.ignore, (nn.Linear,))
    assert sorted(chosen) == sorted(n for n in names if "attention" not in n)


def test_tucker_recipe_on_lenet() -> None:
    torch.manual_seed(0)
    ref = LeNet5().eval()
    model = copy.deepcopy(ref)
    slimkit.compress(model, shipped_dir() / "tucker.yaml")
    x = torch.randn(2, 1, 8, 8)
    assert isinstance(model.conv1, TuckerConv2d) and isinstance(model.conv2, TuckerConv2d)
    assert count_params(model) < count_params(ref)
    assert count_macs(model, x) < count_macs(ref, x)


def test_tucker_recipe_on_the_resnet_skips_grouped_and_depthwise() -> None:
    torch.manual_seed(0)
    ref = MiniResNet().eval()
    model = copy.deepcopy(ref)
    messages: list[str] = []
    slimkit.compress(model, shipped_dir() / "tucker.yaml", progress=messages.append)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | TuckerConv2d)]
    assert sum(isinstance(m, TuckerConv2d) for m in convs) == 8  # every dense conv, 1x1 too
    assert sum("grouped" in m for m in messages) == 2  # groups=4 and the depthwise conv
    assert count_params(model) < count_params(ref)


def test_tucker_ranks_never_exceed_what_the_weight_can_hold(tmp_path: Path) -> None:
    # a 1x1 conv 4 -> 16: the output mode's unfolding is 16 x 4, so rank_out <= 4 (a larger
    # planned rank once built a core of another shape than its spec, and the artifact did not
    # load back)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 4, 5, 5)
    compress(model, "tucker", ratio=0.9, iters=1)
    for m in model.modules():
        if isinstance(m, TuckerConv2d):
            assert m.core.weight.shape[:2] == (m.rank_out, m.rank_in)
            assert m.rank_out <= min(m.out_channels, m.in_channels)
            assert m.rank_in <= min(m.out_channels, m.in_channels)
    slimkit.save(model, tmp_path / "a")
    loaded = slimkit.load(tmp_path / "a", model=nn.Sequential(
        nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_tucker2_refuses_ranks_above_the_unfoldings() -> None:
    with pytest.raises(ValueError, match="rank_out 9 exceeds 4"):
        lowrank.tucker2(torch.randn(16, 4, 1, 1), rank_out=9, rank_in=4)


# -- min_speedup ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tucker", "spatial-svd"])
def test_min_speedup_out_of_reach_keeps_every_layer_and_says_why(method: str) -> None:
    model, ref = convnet(), convnet()
    messages = compress(model, method, data=[x_conv()], ratio=0.5, min_speedup=1000.0)
    assert not any(isinstance(m, TuckerConv2d | SpatialConv2d) for m in model.modules())
    assert count_params(model) == count_params(ref)
    timed = [m for m in messages if "under min_speedup 1000.0" in m]
    assert len(timed) == 2 and all(" ms vs " in m for m in timed)


def test_min_speedup_within_reach_swaps_what_plain_planning_swaps() -> None:
    timed, plain = convnet(), convnet()
    messages = compress(timed, "tucker", data=[x_conv()], ratio=0.5, min_speedup=1e-6)
    compress(plain, "tucker", ratio=0.5)
    kinds = [type(m).__name__ for m in timed.modules()]
    assert kinds == [type(m).__name__ for m in plain.modules()]
    assert sum(" ms vs " in m for m in messages) == 2
    with torch.no_grad():
        assert torch.allclose(timed(x_conv()), plain(x_conv()), atol=1e-5)


def test_min_speedup_needs_inputs_and_a_positive_value() -> None:
    with pytest.raises(DataError, match="calibration data"):
        compress(convnet(), "tucker", ratio=0.5, min_speedup=1.0)
    with pytest.raises(ConfigError, match=r"factorize\.tucker\.min_speedup"):
        TuckerConfig(min_speedup=0.0)
