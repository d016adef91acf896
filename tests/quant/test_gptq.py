"""GPTQ: error compensation beats rounding, exactness properties, damping, the handler."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit.calib.hessian import HessianError, Hessians, accumulate_hessian, inverse_factor
from slimkit.errors import ConfigError, DataError
from slimkit.formats import primitives as P
from slimkit.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quant.gptq import GPTQConfig, gptq_quantize

N_OUT, K = 16, 64


def correlated(n: int = 512, k: int = K, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs (n, k) that mostly live in a ``rank``-dimensional subspace."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.05 * (
        torch.randn(n, k, generator=g)
    )


def hessian(x: torch.Tensor) -> torch.Tensor:
    h, _ = accumulate_hessian(torch.zeros(x.shape[1], x.shape[1]), 0, x)
    return h


def out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).mean())


def weight(seed: int = 1, o: int = N_OUT, k: int = K) -> torch.Tensor:
    return torch.randn(o, k, generator=torch.Generator().manual_seed(seed))


def gptq(config: dict[str, Any]) -> dict[str, Any]:
    return {"name": "gptq", "stages": [{"quantize": {"method": "gptq", **config}}]}


W4G = {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": False}


# -- pure math -----------------------------------------------------------------------------
def test_accumulated_hessian_is_the_mean_of_2xtx() -> None:
    x = correlated(300)
    h, n = torch.zeros(K, K), 0
    for part in x.split(70):
        h, n = accumulate_hessian(h, n, part)
    assert n == 300
    assert float((h - 2 * x.T @ x / 300).abs().max()) <= 1e-4 * float(h.abs().max())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, act_order: bool) -> None:
    x, w = correlated(), weight()
    codes, scale, zero = gptq_quantize(
        w, hessian(x), bits, False, group_size=16, act_order=act_order
    )
    rtn = P.fake_quantize(w, bits, False, group_size=16)
    # measured: GPTQ's output error is 5-20x below rounding's here
    assert out_err(x, w, P.dequantize(codes, scale, zero)) < 0.5 * out_err(x, w, rtn)


@pytest.mark.parametrize(
    "quant",
    [
        {"symmetric": False, "group_size": 16},
        {"symmetric": True, "group_size": 16},
        {"symmetric": True},
        {"symmetric": False, "per_channel": False},
    ],
    ids=["asym-g16", "sym-g16", "sym-channel", "asym-tensor"],
)
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_identity_hessian_is_exactly_rtn(quant: dict[str, Any], bits: int) -> None:
    w = weight()
    per_channel, group = quant.get("per_channel", True), quant.get("group_size")
    codes, scale, zero = gptq_quantize(
        w, torch.eye(K), bits, quant["symmetric"], per_channel, group
    )
    want_scale, want_zero = P.qparams(w, bits, quant["symmetric"], per_channel, group)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes, P.quantize(w, want_scale, want_zero, bits, quant["symmetric"]))
    assert (zero is None) == quant["symmetric"]
    if zero is not None:
        assert torch.equal(zero, want_zero)


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_in_range_and_stored_exactly(symmetric: bool) -> None:
    x, w = correlated(), weight()
    codes, scale, zero = gptq_quantize(w, hessian(x), 3, symmetric, group_size=16)
    qmin, qmax = P.qrange(3, symmetric)
    assert codes.dtype == torch.int8 and codes.shape == (N_OUT, K)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    assert scale.shape == (N_OUT, K // 16) and bool((scale > 0).all())
    q = QuantLinear(K, N_OUT, bias=False, bits=3, symmetric=symmetric, group_size=16)
    q.set_quantized(codes, scale, zero)
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.dense_weight(), P.dequantize(codes, scale, zero))


def test_act_order_with_diagonal_hessian_keeps_original_columns_and_groups() -> None:
    # a diagonal H spreads no error: GPTQ is RTN in any visiting order, so the codes and the
    # group parameters must come back exactly in the original column order
    w = weight()
    h = torch.diag(torch.linspace(0.1, 5.0, K).flip(0).roll(17))
    codes, scale, zero = gptq_quantize(w, h, 4, False, group_size=16, act_order=True)
    want_scale, want_zero = P.qparams(w, 4, False, group_size=16)
    assert torch.equal(scale, want_scale) and torch.equal(zero, want_zero)  # type: ignore[arg-type]
    assert torch.equal(codes, P.quantize(w, want_scale, want_zero, 4, False))


def test_act_order_reconstructs_within_bounds() -> None:
    x, w = correlated(rank=12), weight()
    x[:, :4] *= 10.0  # a few dominant inputs: act_order visits them first
    h = hessian(x)
    codes, scale, zero = gptq_quantize(w, h, 4, False, group_size=16, act_order=True)
    w_hat = P.dequantize(codes, scale, zero)
    # every dequantized weight lies inside its group's range, and the output error beats RTN
    cells = w_hat.reshape(N_OUT, K // 16, 16)
    lo = (P.qrange(4, False)[0] - zero) * scale  # type: ignore[operator]
    hi = (P.qrange(4, False)[1] - zero) * scale  # type: ignore[operator]
    assert bool((cells >= lo[..., None] - 1e-5).all() and (cells <= hi[..., None] + 1e-5).all())
    assert out_err(x, w, w_hat) < 0.5 * out_err(x, w, P.fake_quantize(w, 4, False, group_size=16))


@pytest.mark.parametrize("kind", ["zero", "rank1"])
def test_singular_hessian_gives_a_finite_result(kind: str) -> None:
    w = weight()
    x = torch.zeros(100, K) if kind == "zero" else torch.randn(100, 1) @ torch.randn(1, K)
    codes, scale, zero = gptq_quantize(w, hessian(x), 4, False, group_size=16)
    w_hat = P.dequantize(codes, scale, zero)
    assert bool(torch.isfinite(w_hat).all())
    if kind == "zero":  # every input is dead: the weight is zeroed, exactly
        assert torch.equal(w_hat, torch.zeros_like(w))
    else:
        assert out_err(x, w, w_hat) <= out_err(x, w, P.fake_quantize(w, 4, False, group_size=16))


def test_dead_inputs_get_zero_weights() -> None:
    x, w = correlated(), weight()
    x[:, 5] = 0.0
    codes, scale, zero = gptq_quantize(w, hessian(x), 4, False, group_size=16)
    assert torch.equal(P.dequantize(codes, scale, zero)[:, 5], torch.zeros(N_OUT))


def test_damping_grows_until_the_factorization_works() -> None:
    h = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # eigenvalues 2.05 and -0.05
    _, used = inverse_factor(h, 0.01)
    assert used == pytest.approx(0.1)  # 0.01 leaves -0.04: one 10x step
    w = weight(k=2)
    first, retried = gptq_quantize(w, h, 4, False), gptq_quantize(w, h, 4, False, damp=0.1)
    assert torch.equal(first[0], retried[0]) and torch.equal(first[1], retried[1])
    assert first[2] is not None and retried[2] is not None and torch.equal(first[2], retried[2])


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_hopeless_hessian_is_a_hessian_error_not_linalg(bad: float) -> None:
    h = torch.eye(4) * bad
    with pytest.raises(HessianError, match="not positive definite"):
        gptq_quantize(weight(k=4), h, 4, True)


def test_shape_and_group_mismatch_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"\(64, 64\) Hessian"):
        gptq_quantize(weight(), torch.eye(8), 4, True)
    with pytest.raises(ValueError, match="group_size: got 0; allowed: a positive integer"):
        gptq_quantize(weight(), torch.eye(K), 4, True, group_size=0)


def test_layers_fed_one_tensor_share_the_hessian_product() -> None:
    a, b = nn.Linear(K, 4), nn.Linear(K, 4)
    stats = Hessians({"a": a, "b": b})
    x = correlated(50)
    stats.watch("a", x)
    stats.watch("b", x)
    ha, hb = stats.h["a"], stats.h["b"]
    assert torch.equal(ha, hb) and float((ha - hessian(x)).abs().max()) <= 1e-5


# -- config --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"), [("damp", 0.0), ("damp", 2.0), ("block_size", 0), ("bits", 9)]
)
def test_config_ranges(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"quantize.gptq.{key}: got"):
        GPTQConfig(**{key: value})


# -- the handler ---------------------------------------------------------------------------
class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(K, K), nn.Linear(K, K)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.relu(self.fc1(h)))


class Net(nn.Module):
    """An embedding, two blocks of linears and a conv on a side input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, K)
        self.proj = nn.Linear(K, K)
        self.blocks = nn.ModuleList([Mixer(), Mixer()])
        self.conv = nn.Conv2d(4, 4, 2, padding=1)  # K = 4 * 2 * 2

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.emb(ids))  # (B, T, K)
        for block in self.blocks:
            h = block(h)
        return h.mean(1)[:, :4] + self.conv(img).mean((2, 3))


def data(n: int = 3, scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randint(0, 30, (4, 6), generator=g), scale * torch.randn(4, 4, 5, 5, generator=g))
        for _ in range(n)
    ]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def out(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*b) for b in batches])


def test_handler_quantizes_every_layer_kind_and_beats_rtn(net: Net) -> None:
    calib = data()
    rtn = slimkit.compress(copy.deepcopy(net), {"name": "r", "stages": [{"quantize": W4G}]})
    lines: list[str] = []
    q = slimkit.compress(copy.deepcopy(net), gptq(W4G), data=calib, progress=lines.append)
    assert isinstance(q.emb, QuantEmbedding) and isinstance(q.conv, QuantConv2d)
    assert all(isinstance(m, QuantLinear) for m in (q.proj, q.blocks[0].fc1, q.blocks[1].fc2))
    assert torch.equal(q.emb.codes, rtn.emb.codes)  # embeddings: round to nearest
    assert any("block 2/2" in line for line in lines)
    ref = out(net, calib)
    assert float(((out(q, calib) - ref) ** 2).mean()) < float(((out(rtn, calib) - ref) ** 2).mean())


def test_grouped_conv_is_rounded_to_nearest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    cfg = {"bits": 4, "granularity": "per_channel"}
    q = slimkit.compress(copy.deepcopy(model), gptq(cfg), data=[torch.randn(2, 4, 6, 6)])
    want = QuantConv2d.from_float(model[0], bits=4)
    assert torch.equal(q[0].codes, want.codes) and torch.equal(q[0].scale, want.scale)


def test_overflowing_hessian_falls_back_to_rtn_with_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    lines: list[str] = []
    x = torch.full((16, 8), 1e25)  # finite inputs, x^2 overflows: H is inf
    q = slimkit.compress(copy.deepcopy(model), gptq({"bits": 4}), data=[x], progress=lines.append)
    assert any(line.startswith("warning: gptq: 0:") for line in lines)
    assert torch.equal(q[0].codes, QuantLinear.from_float(model[0], bits=4).codes)


def test_group_size_not_dividing_gives_a_short_last_group(net: Net) -> None:
    # proj: 64 inputs in groups of 48 and 16; conv: its 16 inputs are one short group
    q = slimkit.compress(net, gptq({**W4G, "group_size": 48}), data=data())
    assert isinstance(q.proj, QuantLinear) and q.proj.scale.shape == (K, 2)
    assert isinstance(q.conv, QuantConv2d) and q.conv.scale.shape == (4, 1)
    assert bool(torch.isfinite(out(q, data())).all())


def test_no_calibration_data_is_data_error_before_work(net: Net) -> None:
    with pytest.raises(DataError, match="gptq needs calibration data"):
        slimkit.compress(net, gptq(W4G))
    with pytest.raises(DataError, match="empty"):
        slimkit.compress(net, gptq(W4G), data=[])
    assert type(net.proj) is nn.Linear and type(net.emb) is nn.Embedding


def test_nan_in_calibration_input_is_data_error_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    x[2, 1] = float("nan")
    with pytest.raises(DataError, match=r"layer '0' hold NaN"):
        slimkit.compress(model, gptq({"bits": 4}), data=[x])
    assert type(model[0]) is nn.Linear


def test_save_load_round_trip_is_bit_exact(net: Net, tmp_path: Path) -> None:
    calib = data()
    q = slimkit.compress(net, gptq({**W4G, "act_order": True}), data=calib)
    y = out(q, calib)
    slimkit.save(q, tmp_path / "g")
    torch.manual_seed(99)
    loaded = slimkit.load(tmp_path / "g", model=Net())
    assert torch.equal(out(loaded, calib), y)
