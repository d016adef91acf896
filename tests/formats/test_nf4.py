"""NF4: the levels of QLoRA, nearest-level rounding, and the format through a recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
from slimkit import pipeline
from slimkit.config import Granularity
from slimkit.errors import ConfigError
from slimkit.formats.base import Scheme, check_format
from slimkit.formats.nf4 import LEVELS, NF4Format
from slimkit.layers.weight import FormatLinear
from slimkit.recipe import Recipe

#: the NF4 levels as QLoRA published them (bitsandbytes' NF4 table)
PUBLISHED = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_levels_are_qloras() -> None:
    assert LEVELS.dtype == torch.float32 and LEVELS.shape == (16,)
    assert torch.allclose(LEVELS, torch.tensor(PUBLISHED), atol=1e-7, rtol=0)
    assert float(LEVELS[7]) == 0.0 and float(LEVELS[0]) == -1.0 and float(LEVELS[15]) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_each_weight_gets_its_nearest_level(
    rows: int, groups: int, seed: int, scale: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 8 * groups, generator=gen) * scale
    fmt = NF4Format((rows, 8 * groups), Granularity.PER_GROUP, 8)
    t = fmt.encode(w)
    absmax = w.reshape(rows, groups, 8).abs().amax(dim=2)
    assert torch.equal(t["scale"], absmax)
    normalized = (w.reshape(rows, groups, 8) / absmax.unsqueeze(2)).reshape(-1)
    chosen = LEVELS[fmt.unpack(t)]
    best = (normalized.unsqueeze(1) - LEVELS).abs().min(dim=1).values
    assert torch.allclose((normalized - chosen).abs(), best, atol=1e-6)
    # so the error is at most half the widest gap between levels, times the group's scale
    half_gap = float((LEVELS[1:] - LEVELS[:-1]).max()) / 2
    error = (fmt.decode(t) - w).reshape(rows, groups, 8).abs()
    assert bool((error <= absmax.unsqueeze(2) * (half_gap + 1e-6)).all())


def test_zero_groups_decode_to_zeros_and_the_extremes_exactly() -> None:
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, -3.0, 3.0, 0.0, 1.5]])
    fmt = NF4Format((1, 8), Granularity.PER_GROUP, 4)
    t = fmt.encode(w)
    out = fmt.decode(t)
    assert torch.equal(t["scale"], torch.tensor([[1.0, 3.0]]))
    assert torch.equal(out[0, :4], torch.zeros(4))
    assert float(out[0, 4]) == -3.0 and float(out[0, 5]) == 3.0 and float(out[0, 6]) == 0.0


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        (Scheme(8, Granularity.PER_GROUP, 8, True), "4-bit"),
        (Scheme(4, Granularity.PER_GROUP, 8, False), "symmetric"),
        (Scheme(4, Granularity.PER_GROUP, 0, True), "group_size: got 0"),
    ],
)
def test_schemes_nf4_cannot_hold_are_refused(scheme: Scheme, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NF4Format.from_scheme((4, 16), scheme)


def test_specs_are_checked() -> None:
    good = {"kind": "nf4", "granularity": "per_group", "group_size": 8}
    assert check_format((4, 16), good) is None
    assert check_format((4, 12), good) is None  # 2 groups a row, the last of 4 inputs
    assert "group_size=0" in str(check_format((4, 12), {**good, "group_size": 0}))
    assert "unknown key" in str(check_format((4, 16), {**good, "bits": 4}))
    per_row = {"kind": "nf4", "granularity": "per_channel", "group_size": None}
    assert check_format((4, 16), per_row) is None


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def nf4_recipe(**options: object) -> dict[str, object]:
    stage = {"method": "rtn", "format": "nf4", "bits": 4, "granularity": "per_group"}
    return {"name": "r", "stages": [{"quantize": {**stage, "group_size": 16, **options}}]}


def test_rtn_with_the_nf4_format_saves_and_loads_bit_exactly(tmp_path: Path) -> None:
    model = slimkit.compress(mlp(), nf4_recipe())
    assert all(type(model[i]) is FormatLinear for i in (0, 2))
    assert model[0].format == NF4Format((16, 32), Granularity.PER_GROUP, 16)
    x = torch.randn(5, 32)
    slimkit.save(model, tmp_path / "a")
    loaded = slimkit.load(tmp_path / "a", model=mlp())
    assert torch.equal(loaded(x), model(x))
    assert loaded[0].format == model[0].format
    # 4 bits per weight plus one fp32 scale per 16 weights: 6 bits a weight, not 32
    assert model[0].indices.numel() == 16 * 32 // 2


def test_nf4_options_are_checked_before_any_work() -> None:
    recipe = Recipe.from_dict(nf4_recipe(bits=8))
    with pytest.raises(ConfigError, match=r"format: layer '0': nf4 stores 4-bit codes"):
        pipeline.precheck(mlp(), recipe)


def test_an_unknown_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"format.*one of .*affine.*nf4"):
        Recipe.from_dict(nf4_recipe(format="nf5"))
