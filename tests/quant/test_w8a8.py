"""W8A8 dynamic: kernels agree with integer arithmetic, SmoothQuant is exact before rounding,
layers round-trip through artifacts, bad input fails before work."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
from slimkit.errors import ConfigError, DataError
from slimkit.quant import kernels
from slimkit.quant.smoothquant import smoothing_factors
from slimkit.quant.w8a8 import DynamicQuantLinear, W8A8Config

KERNELS = ["reference", "fbgemm", "int_mm"]


def recipe(**options: object) -> dict:
    return {"name": "w8a8", "stages": [{"quantize": {"method": "w8a8-dynamic", **options}}]}


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def exact_int8(x: torch.Tensor, w: DynamicQuantLinear) -> torch.Tensor:
    """Per-token symmetric int8 activations times the int8 weight, in int64 arithmetic."""
    q, sx = kernels.quantize_per_token(x)
    acc = q.long() @ w.qweight.long().t()  # (M, N) exact
    return acc.double() * sx.double() * w.scale.reshape(1, -1).double()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@given(rows=st.integers(1, 40), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_quantize_per_token_error_bound(rows: int, seed: int) -> None:
    x = torch.randn(rows, 24, generator=torch.Generator().manual_seed(seed)) * 3
    q, scale = kernels.quantize_per_token(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert bool(((q.float() * scale - x).abs() <= scale / 2 + 1e-6).all())


@pytest.mark.parametrize("kernel", ["reference", "int_mm"])
def test_exact_kernels_match_integer_arithmetic(kernel: str) -> None:
    layer = DynamicQuantLinear.from_float(nn.Linear(64, 24, bias=False), kernel=kernel)
    x = torch.randn(40, 64)
    expected = exact_int8(x, layer)
    got = layer(x).double()
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_fbgemm_kernel_close_to_float() -> None:
    """Uniform weights put many codes near +-127: 8-bit activations would overflow the
    kernel's 16-bit pair sums here (about 20% error); the 7-bit path stays accurate."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("torch built without fbgemm")
    m = nn.Linear(128, 48)
    layer = DynamicQuantLinear.from_float(m, kernel="fbgemm")
    x = torch.randn(64, 128)
    y, yq = m(x).detach(), layer(x)
    assert float((yq - y).norm() / y.norm()) < 0.03


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_handle_3d_input_and_bias(kernel: str) -> None:
    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("torch built without fbgemm")
    m = nn.Linear(32, 16)
    layer = DynamicQuantLinear.from_float(m, kernel=kernel)
    x = torch.randn(2, 20, 32)
    y, yq = m(x).detach(), layer(x)
    assert yq.shape == (2, 20, 16)
    assert float((yq - y).norm() / y.norm()) < 0.03


def test_resolve_rejects_unknown_kernel_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="allowed: auto"):
        kernels.int8_kernel("cublas")
    monkeypatch.setenv("SLIMKIT_INT8_KERNEL", "reference")
    assert kernels.int8_kernel("auto") == "reference"


def test_auto_prefers_int_mm_only_with_int8_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLIMKIT_INT8_KERNEL", raising=False)
    monkeypatch.setattr(kernels, "has_int8_dot", lambda: True)
    assert kernels.int8_kernel("auto") == "int_mm"
    monkeypatch.setattr(kernels, "has_int8_dot", lambda: False)
    assert kernels.int8_kernel("auto") in ("fbgemm", "reference")


def test_smoothing_is_exact_before_rounding() -> None:
    w = torch.randn(8, 16)
    x = torch.randn(10, 16) * torch.linspace(0.1, 20, 16)  # outlier channels
    s = smoothing_factors(x.abs().amax(0), w, alpha=0.5)
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4, atol=1e-4)
    # the activation channel ranges get flatter
    spread = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).min())  # noqa: E731
    assert spread(x / s) < spread(x)


def test_smoothing_dead_channels_get_one() -> None:
    w = torch.randn(4, 3)
    w[:, 1] = 0
    s = smoothing_factors(torch.tensor([0.0, 2.0, 1.0]), w, alpha=0.5)
    assert s[0] == 1 and s[1] == 1 and bool(torch.isfinite(s).all())


def test_smoothquant_lowers_error_with_outlier_channels() -> None:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(64, 32, bias=False))
    gain = torch.ones(64)
    gain[:3] = 60.0  # three outlier channels, as after a LayerNorm in a transformer
    data = [torch.randn(64, 64) * gain for _ in range(4)]
    x = torch.randn(256, 64) * gain
    y = m(x).detach()
    errors = {}
    for sq in (False, True):
        q = slimkit.compress(copy.deepcopy(m), recipe(smoothquant=sq, kernel="reference"), data)
        errors[sq] = float((q(x) - y).norm() / y.norm())
    assert errors[True] < 0.7 * errors[False]


def test_compress_swaps_linears_and_is_not_simulated(tmp_path) -> None:
    model = TwoLayer()
    x = torch.randn(30, 32)
    y = model(x).detach()
    q = slimkit.compress(model, recipe(kernel="reference"))
    assert isinstance(q.fc1, DynamicQuantLinear) and not q.fc1.simulated
    assert float((q(x) - y).norm() / y.norm()) < 0.02
    path = slimkit.save(q, tmp_path / "a")
    back = slimkit.load(path, model=TwoLayer())
    assert isinstance(back.fc2, DynamicQuantLinear)
    assert back.fc1.kernel == back.fc2.kernel == "reference"  # the recipe's kernel survives
    assert torch.equal(back(x), q(x))


def test_smoothquant_needs_data_before_any_work() -> None:
    model = TwoLayer()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DataError, match="calibration data"):
        slimkit.compress(model, recipe(smoothquant=True))
    with pytest.raises(DataError, match="empty"):
        slimkit.compress(model, recipe(smoothquant=True), data=[])
    assert isinstance(model.fc1, nn.Linear)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_nan_in_calibration_names_the_layer() -> None:
    model = TwoLayer()
    model.fc1.bias.data[0] = float("nan")  # NaN appears only in fc2's input
    model.fc1.bias.requires_grad_(False)
    with pytest.raises(Exception, match="fc1"):
        slimkit.compress(model, recipe(smoothquant=True), data=[torch.randn(4, 32)])


def test_nan_activations_from_data_name_the_layer() -> None:
    model = TwoLayer()
    bad = torch.randn(4, 32)
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"'fc1'.*NaN"):
        slimkit.compress(model, recipe(smoothquant=True), data=[bad])


@pytest.mark.parametrize(("key", "value"), [("alpha", 1.5), ("kernel", "cuda")])
def test_bad_options(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        W8A8Config(**{key: value})


def test_deepcopy_drops_prepared_kernel_weight() -> None:
    layer = DynamicQuantLinear.from_float(nn.Linear(16, 8), kernel="reference")
    layer(torch.randn(3, 16))
    assert layer._prepared is not None
    assert copy.deepcopy(layer)._prepared is None
