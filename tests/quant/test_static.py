"""Static activation quantization: integer arithmetic, code ranges, round trips, bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.compressed import count_params, is_simulated, module_class
from slimkit.errors import ConfigError, DataError
from slimkit.formats import primitives as P
from slimkit.layers.activations import quantize_activation
from slimkit.layers.quantized import QuantLinear
from slimkit.quant.observers import OBSERVERS
from slimkit.quant.static import (
    StaticQuantConfig,
    StaticQuantConv2d,
    StaticQuantLinear,
)
from slimkit.recipe import Recipe, shipped_dir

OBSERVER_NAMES = ["minmax", "moving_average", "percentile", "mse", "kl"]


def recipe(**options: Any) -> dict[str, Any]:
    return {"name": "static", "stages": [{"quantize": {"method": "w8a8-static", **options}}]}


class ConvNet(nn.Module):
    """Two convolutions and two linears, ReLUs between: every layer kind the method takes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.fc1 = nn.Linear(6 * 3 * 3, 12)
        self.fc2 = nn.Linear(12, 3)
        self.norm = nn.LayerNorm(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, 6, 6)
        h = F.relu(self.conv1(x))  # (B, 4, 6, 6)
        h = F.relu(self.conv2(h)).flatten(1)  # (B, 54)
        return self.fc2(F.relu(self.norm(self.fc1(h))))  # (B, 3)


def batches(n: int = 3, seed: int = 0, size: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 2, 6, 6, generator=g) for _ in range(n)]


@pytest.fixture
def net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def calibrated_linear(x: torch.Tensor, **quant: Any) -> StaticQuantLinear:
    """A static layer with its activation range from the min/max of ``x``."""
    q = StaticQuantLinear.empty_like(nn.Linear(x.shape[-1], 5), **quant)
    q.set_weight(torch.randn(5, x.shape[-1]))
    lo, hi = torch.aminmax(x)
    q.set_activation_params(*P.params_from_range(lo, hi, q.act_bits, q.act_symmetric))
    return q


# -- integer arithmetic --------------------------------------------------------------------
@pytest.mark.parametrize("weight_symmetric", [True, False])
@pytest.mark.parametrize("act_symmetric", [True, False])
def test_linear_equals_integer_reference(weight_symmetric: bool, act_symmetric: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(7, 16) * 3 + 1
    q = calibrated_linear(x, symmetric=weight_symmetric, act_symmetric=act_symmetric)
    qx = q.input_codes(x).to(torch.int64) - int(q.act_zero)  # (7, 16) q_x - z_x
    w_zero = q.zero_point if q.zero_point is not None else torch.zeros(5, 1)
    qw = q.codes.to(torch.int64) - w_zero.to(torch.int64)  # (5, 16) q_w - z_w
    acc = qx @ qw.t()  # (7, 5) exact int64 accumulation
    ref = acc.double() * float(q.act_scale) * q.scale.double().t() + q.bias.double()
    y = q(x)
    # fp32 rounding: a few ulps of the sum of |terms|
    size = (qx.abs() @ qw.abs().t()).double() * float(q.act_scale) * q.scale.double().t()
    assert bool(((y.double() - ref).abs() <= 1e-5 * (size + q.bias.double().abs()) + 1e-7).all())


def test_conv_equals_integer_reference() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.rand(2, 3, 7, 7) * 4  # non-negative, as after a ReLU
    q = StaticQuantConv2d.from_float(conv)
    lo, hi = torch.aminmax(x)
    q.set_activation_params(*P.params_from_range(lo, hi, 8, False))
    zx = int(q.act_zero)
    codes = q.input_codes(x) - zx  # (2, 3, 7, 7) q_x - z_x, integers in fp32
    # zero padding is the code of 0.0, i.e. q_x - z_x = 0
    cols = F.unfold(codes, 3, padding=1, stride=2).to(torch.int64)  # (2, 27, 16)
    acc = q.codes.reshape(4, -1).to(torch.int64) @ cols  # (2, 4, 16) exact
    ref = acc.double() * float(q.act_scale) * q.scale.double() + q.bias.double()[:, None]
    y = q(x).reshape(2, 4, -1).double()  # (2, 4, 16)
    size = q.codes.reshape(4, -1).abs().double() @ cols.abs().double()  # (2, 4, 16)
    bound = 1e-5 * (size * float(q.act_scale) * q.scale.double() + q.bias.double().abs()[:, None])
    assert bool(((y - ref).abs() <= bound + 1e-7).all())


def test_activations_really_rounded() -> None:
    x = torch.linspace(0.0, 1.0, 1000).reshape(10, 100)
    q = calibrated_linear(x)
    seen = q.layer_input(x)
    assert len(torch.unique(seen)) <= 256  # 8 bits: at most 256 distinct inputs
    assert float((seen - x).abs().max()) <= float(q.act_scale) / 2 * 1.0001
    assert not torch.equal(seen, x)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (3, True)])
def test_activation_codes_within_range(bits: int, symmetric: bool) -> None:
    torch.manual_seed(3)
    calib = torch.randn(50, 8)
    q = calibrated_linear(calib, act_bits=bits, act_symmetric=symmetric)
    x = torch.randn(40, 8) * 5  # well outside the calibrated range: clamped
    codes = q.input_codes(x)
    qmin, qmax = P.qrange(bits, symmetric)
    assert torch.equal(codes, codes.round())
    assert int(codes.min()) == qmin and int(codes.max()) == qmax
    assert torch.equal(codes, quantize_activation(x, q.act_scale, q.act_zero, bits, symmetric))


def test_zero_is_exact() -> None:
    q = calibrated_linear(torch.rand(10, 6) + 0.5)  # range widened to hold 0
    assert float(q.layer_input(torch.zeros(1, 6)).abs().max()) == 0.0


def test_bad_activation_params_refused() -> None:
    q = calibrated_linear(torch.randn(4, 6))
    with pytest.raises(ValueError, match="positive"):
        q.set_activation_params(torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="zero point 300"):
        q.set_activation_params(torch.tensor(0.1), torch.tensor(300.0))


# -- storage, spec, save/load --------------------------------------------------------------
def test_storage_and_describe(net: ConvNet) -> None:
    before = count_params(net)
    slimkit.compress(net, recipe(), data=batches())
    assert type(net.conv1) is StaticQuantConv2d and type(net.conv2) is StaticQuantConv2d
    assert type(net.fc1) is StaticQuantLinear and type(net.fc2) is StaticQuantLinear
    assert type(net.norm) is nn.LayerNorm
    assert net.fc1.codes.dtype == torch.int8 and net.fc1.scale.shape == (12, 1)
    assert net.fc1.act_scale.shape == (1,) and net.fc1.act_zero.shape == (1,)
    assert not is_simulated(net)
    assert count_params(net) == before
    assert net.fc1.describe() == (
        "int8 weights and activations (static ranges), "
        "integer arithmetic on the fp32 kernel (no faster)"
    )


def test_spec_round_trip_bit_exact(net: ConvNet) -> None:
    slimkit.compress(net, recipe(act_bits=6, bits=4), data=batches())
    g = torch.Generator().manual_seed(8)
    inputs = [torch.rand(2, 4, 6, 6, generator=g), torch.rand(2, 54, generator=g)]
    for layer, x in zip((net.conv2, net.fc1), inputs, strict=True):
        spec = layer.spec()
        assert spec["act_bits"] == 6 and spec["act_symmetric"] is False and spec["bits"] == 4
        cls = module_class(type(layer).__name__)
        assert cls is type(layer)
        fresh = cls.from_spec(spec)
        fresh.load_state_dict(layer.state_dict())
        for key, value in layer.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key
        assert torch.equal(fresh(x), layer(x))


def test_save_load_bit_exact(net: ConvNet, tmp_path: Path) -> None:
    slimkit.compress(net, recipe(observer="percentile"), data=batches())
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        y = net(x)
    slimkit.save(net, tmp_path / "static")
    torch.manual_seed(123)
    loaded = slimkit.load(tmp_path / "static", model=ConvNet())
    assert type(loaded.fc1) is StaticQuantLinear and type(loaded.conv1) is StaticQuantConv2d
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


# -- the method on a small model -----------------------------------------------------------
# max |error| / max |output| on held-out data.
OBSERVER_ERROR = {
    "minmax": 0.04,
    "moving_average": 0.05,
    "percentile": 0.04,
    "mse": 0.04,
    "kl": 0.05,
}


@pytest.mark.parametrize("observer", OBSERVER_NAMES)
def test_each_observer_close_to_float(net: ConvNet, observer: str) -> None:
    ref = copy.deepcopy(net)
    slimkit.compress(net, recipe(observer=observer), data=batches(8, size=64))
    x = batches(1, seed=1, size=64)[0]
    with torch.no_grad():
        y, yq = ref(x), net(x)
    assert float((y - yq).abs().max()) <= OBSERVER_ERROR[observer] * float(y.abs().max())


def test_ranges_cover_calibration_inputs(net: ConvNet) -> None:
    data = batches()
    seen: list[torch.Tensor] = []
    handle = net.fc1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for x in data:
            net(x)
    handle.remove()
    lo, hi = torch.aminmax(torch.cat(seen))
    slimkit.compress(net, recipe(observer="minmax"), data=data)
    scale, zero = P.params_from_range(lo, hi, 8, False)
    assert torch.equal(net.fc1.act_scale, scale.reshape(1))
    assert torch.equal(net.fc1.act_zero, zero.reshape(1))


def test_targets_and_ignore(net: ConvNet) -> None:
    slimkit.compress(net, recipe(targets=["fc*"], ignore=["fc2"]), data=batches())
    assert type(net.fc1) is StaticQuantLinear
    assert type(net.fc2) is nn.Linear and type(net.conv1) is nn.Conv2d


def test_shipped_recipe_equals_dict(net: ConvNet) -> None:
    shipped = Recipe.from_file(shipped_dir() / "w8a8-static.yaml")
    assert shipped.stages == (StaticQuantConfig(),)
    other = copy.deepcopy(net)
    slimkit.compress(net, shipped_dir() / "w8a8-static.yaml", data=batches())
    slimkit.compress(other, recipe(), data=batches())
    x = batches(1, seed=4)[0]
    with torch.no_grad():
        assert torch.equal(net(x), other(x))


# -- bad input -----------------------------------------------------------------------------
def test_unknown_observer_lists_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        StaticQuantConfig(observer="minmx")
    message = str(info.value)
    assert "observer" in message and "'minmx'" in message
    assert all(name in message for name in OBSERVERS)
    with pytest.raises(ConfigError, match="observer"):
        slimkit.compress(nn.Linear(2, 2), recipe(observer="histogram"), data=[torch.ones(1, 2)])


@pytest.mark.parametrize(
    "options",
    [{"act_bits": 1}, {"act_bits": 9}, {"percentile": 0.0}, {"percentile": 100.5}],
    ids=["act_bits-1", "act_bits-9", "percentile-0", "percentile-100.5"],
)
def test_bad_options_refused(options: dict[str, Any]) -> None:
    (key,) = options
    with pytest.raises(ConfigError, match=key):
        StaticQuantConfig(**options)


@pytest.mark.parametrize("data", [None, []], ids=["none", "empty"])
def test_no_calibration_data_refused_before_work(net: ConvNet, data: Any) -> None:
    ref = copy.deepcopy(net)
    with pytest.raises(DataError, match="data"):
        slimkit.compress(net, recipe(), data=data)
    assert type(net.fc1) is nn.Linear and type(net.conv1) is nn.Conv2d
    for key, value in ref.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)


class LogNet(nn.Module):
    """``fc2`` receives log of a possibly negative value: NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.log(self.fc1(x)))


def test_nan_activation_names_layer() -> None:
    torch.manual_seed(0)
    model = LogNet()
    with torch.no_grad():
        model.fc1.weight.copy_(-torch.eye(3))
        model.fc1.bias.zero_()
    with pytest.raises(DataError, match=r"layer 'fc2' hold NaN"):
        slimkit.compress(model, recipe(), data=[torch.ones(2, 3)])
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear


def test_unused_layer_refused() -> None:
    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    model.forward = lambda x: model["used"](x)  # type: ignore[method-assign]
    with pytest.raises(DataError, match="layer 'unused' saw no calibration input"):
        slimkit.compress(model, recipe(), data=[torch.ones(1, 2)])
    assert type(model["used"]) is nn.Linear


def test_plain_quant_layer_is_not_static() -> None:
    q = QuantLinear.from_float(nn.Linear(3, 2))
    assert not hasattr(q, "act_scale")


# -- digits --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("observer", OBSERVER_NAMES)
def test_digits_lenet_w8a8_static_drop(observer: str) -> None:
    from slimkit.tasks import get

    task = get("digits-lenet")
    base = task.evaluate(task.model())["accuracy"]
    quantized = slimkit.compress(task.model(), recipe(observer=observer), task=task)
    assert isinstance(quantized.fc1, StaticQuantLinear)
    assert base - task.evaluate(quantized)["accuracy"] <= 0.003  # at most 0.3 points
