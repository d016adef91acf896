"""The separable stage (separable/stage.py): SeparableConv2d, the handler, save and load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
import slimkit.separable.stage  # registers the stage
from slimkit.compressed import count_params
from slimkit.errors import ConfigError
from slimkit.evaluate.macs import count_macs
from slimkit.recipe import Recipe, resolve
from slimkit.separable.fit import compose
from slimkit.separable.stage import SeparableConfig, SeparableConv2d


def separable(**options: object) -> dict[str, object]:
    return {"name": "s", "stages": [{"separable": {"method": "depthwise", **options}}]}


class Two(nn.Module):
    """A 3x3 64 -> 64 convolution with a bias, a grouped 3x3 and a 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.point = nn.Conv2d(64, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64, H, W)
        return self.point(self.grouped(torch.relu(self.conv(x))))  # (B, 16, H, W)


def two(seed: int = 0) -> Two:
    torch.manual_seed(seed)
    return Two().eval()


def conv_params(model: nn.Module) -> int:
    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
        for p in m.parameters(recurse=False)
    )


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 4),  # Cin
    st.integers(1, 6),  # Cout
    st.integers(1, 2),  # m
    st.sampled_from([(3, 3), (2, 3), (3, 1)]),
    st.integers(0, 2**31 - 1),
)
def test_an_exactly_separable_conv_gives_the_same_outputs(cin, cout, m, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, stride=2, padding=1, dilation=(2, 1))
    d = torch.randn(cin * m, 1, *kernel, generator=g)
    p = torch.randn(cout, cin * m, 1, 1, generator=g)
    with torch.no_grad():
        conv.weight.copy_(compose(d, p, cin))
        conv.bias.copy_(torch.randn(cout, generator=g))
    layer = SeparableConv2d.fit(conv, m)
    torch.testing.assert_close(layer.dense_weight(), conv.weight, atol=1e-4, rtol=0)
    x = torch.randn(2, cin, 9, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), atol=1e-4, rtol=1e-4)
    assert layer.fit_error is not None and layer.fit_error < 1e-5


def test_params_and_macs_of_a_3x3_64_to_64_conv_fall_by_the_expected_factor():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False)).eval()
    x = torch.randn(1, 64, 8, 8)
    before_params, before_macs = count_params(model), count_macs(model, x)
    slimkit.compress(model, separable())
    layer = model[0]
    assert isinstance(layer, SeparableConv2d)
    factor = (64 * 64 * 9) / (64 * 9 + 64 * 64)  # 8.0x
    assert count_params(model) == 64 * 9 + 64 * 64 == layer.weights()
    assert before_params / count_params(model) == pytest.approx(factor)
    assert before_macs / count_macs(model, x) == pytest.approx(factor)
    assert "multiplier 1" in layer.describe() and "fit error" in layer.describe()


def test_count_params_counts_the_children_once_and_the_bias():
    layer = SeparableConv2d(8, 4, [3, 3], depth_multiplier=2, bias=True)
    assert layer.n_params() == 0
    assert count_params(layer) == 8 * 2 * 9 + 4 * 16 + 4 == layer.weights() + 4


def test_grouped_and_1x1_convs_are_skipped_with_a_report():
    model, messages = two(), []
    slimkit.compress(model, separable(), progress=messages.append)
    assert isinstance(model.conv, SeparableConv2d)
    assert type(model.grouped) is nn.Conv2d and type(model.point) is nn.Conv2d
    text = "\n".join(messages)
    assert "grouped skipped: already a grouped convolution (groups=4)" in text
    assert "point skipped: kernel 1x1 is smaller than min_kernel 3" in text
    assert "conv: 36864 -> 4672 weights, relative fit error" in text
    assert "1 of 3 convolutions converted" in text


def test_depthwise_and_larger_layers_are_skipped_unless_allowed():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 3)).eval()
    messages: list[str] = []
    slimkit.compress(model, separable(depth_multiplier=2), progress=messages.append)
    assert "already a depthwise convolution (groups=4)" in messages[1]
    # 4*2*9 + 2*8 = 88 weights against the original 72
    assert "would hold 88 weights, not fewer than 72 (skip_if_larger)" in messages[2]
    assert type(model[1]) is nn.Conv2d
    slimkit.compress(model, separable(depth_multiplier=2, skip_if_larger=False))
    assert isinstance(model[1], SeparableConv2d) and model[1].weights() == 88
    assert type(model[0]) is nn.Conv2d


def test_save_and_load_round_trip_bit_exact(tmp_path: Path):
    model = slimkit.compress(two(), separable(depth_multiplier=2))
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        expected = model(x)
    slimkit.save(model, tmp_path / "a")
    back = slimkit.load(tmp_path / "a", model=two(seed=9))
    assert isinstance(back.conv, SeparableConv2d)
    assert back.conv.spec() == model.conv.spec()
    assert back.conv.fit_error == model.conv.fit_error
    with torch.no_grad():
        assert torch.equal(back(x), expected)
    assert count_params(back) == count_params(model)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"depth_multiplier": 0}, "depth_multiplier"),
        ({"depth_multiplier": 1.5}, "depth_multiplier"),
        ({"min_kernel": 1}, "min_kernel"),
        ({"skip_if_larger": "yes"}, "skip_if_larger"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=rf"separable\.depthwise\.{field}"):
        SeparableConfig(**options)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=field):
        Recipe.from_dict(separable(**options))


def test_the_shipped_recipe_parses():
    recipe = Recipe.from_file(resolve("separable"))
    separable_stage, recovery = recipe.stages
    assert isinstance(separable_stage, SeparableConfig)
    assert separable_stage.depth_multiplier == 1
    assert (recovery.kind, recovery.teacher) == ("distill", "original")


def test_conv_params_of_digits_resnet_fall_at_least_3x():
    task = slimkit.tasks.get("digits-resnet")
    model = task.model()
    before = conv_params(model)
    slimkit.compress(model, separable())
    converted = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    assert len(converted) == 5  # stem, block1 x2, block2.conv1, block4.branch3
    assert before / conv_params(model) >= 3.0
    with torch.no_grad():
        assert model(task.example_inputs()).shape == (1, 10)
