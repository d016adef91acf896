"""AWQ: scale search, clipping search, stored input scaling, the handler."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit.config import Granularity
from slimkit.errors import ConfigError, DataError
from slimkit.formats import primitives as P
from slimkit.formats.base import Scheme
from slimkit.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quant.awq import (
    AWQConfig,
    awq_quantize,
    awq_scales,
    cell_errors,
    output_error,
    quantize_clipped,
    search_clip,
)

N_OUT, K, G = 24, 64, 16


def outlier_inputs(n: int = 400, k: int = K, seed: int = 0) -> torch.Tensor:
    """Inputs (n, k) whose first four channels are 30x larger than the rest."""
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    x[:, :4] *= 30.0
    return x


def weight(seed: int = 1, o: int = N_OUT, k: int = K) -> torch.Tensor:
    return torch.randn(o, k, generator=torch.Generator().manual_seed(seed))


def out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).sum())


def awq(config: dict[str, Any]) -> dict[str, Any]:
    return {"name": "awq", "stages": [{"quantize": {"method": "awq", **config}}]}


W4G = {"bits": 4, "granularity": "per_group", "group_size": G, "symmetric": False}


# -- pure math -----------------------------------------------------------------------------
def test_scales_are_normalised_powers() -> None:
    m = torch.tensor([4.0, 1.0, 0.25, 0.0])
    assert torch.equal(awq_scales(m, 0.0), torch.ones(4))
    s = awq_scales(m, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-6)
    assert float(s[0] / s[1]) == pytest.approx(2.0, rel=1e-6)  # sqrt(4 / 1)
    assert bool(torch.isfinite(s).all() and (s > 0).all())  # the dead channel too


def grouped(bits: int) -> Scheme:
    return Scheme(bits, Granularity.PER_GROUP, G, symmetric=False)


def test_output_error_is_the_squared_output_difference() -> None:
    x, d = outlier_inputs(), weight()
    assert output_error(d, x.T @ x) == pytest.approx(float(((x @ d.T) ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_with_large_input_channels(bits: int) -> None:
    x, w = outlier_inputs(), weight()
    codes, scale, zero, s = awq_quantize(w, x.T @ x, x.abs().mean(0), grouped(bits), clip=False)
    w_hat = P.dequantize(codes, scale, zero) / s
    # measured: about 3x below rounding's error at 3 and 4 bits
    assert out_err(x, w, w_hat) < 0.6 * out_err(x, w, P.fake_quantize(w, bits, False, group_size=G))


def test_uniform_channels_and_no_clip_give_exactly_rtn() -> None:
    # every alpha gives s = 1 when all channels are alike: plain round-to-nearest
    x, w = torch.randn(200, K), weight()
    codes, scale, zero, s = awq_quantize(w, x.T @ x, torch.ones(K), grouped(4), clip=False)
    want_scale, want_zero = P.qparams(w, 4, False, group_size=G)
    assert torch.equal(s, torch.ones(K))
    assert torch.equal(scale, want_scale) and torch.equal(zero, want_zero)  # type: ignore[arg-type]
    assert torch.equal(codes, P.quantize(w, want_scale, want_zero, 4, False))


@pytest.mark.parametrize(
    "quant",
    [Granularity.PER_GROUP, Granularity.PER_CHANNEL, Granularity.PER_TENSOR],
    ids=["group", "channel", "tensor"],
)
def test_clip_search_never_raises_a_cell_error(quant: Granularity) -> None:
    x, w = outlier_inputs(), weight()
    w[3, 7] = 8.0  # an outlier weight that clipping should cut
    gram = x.T @ x
    scheme = Scheme(3, quant, G if quant is Granularity.PER_GROUP else None, symmetric=False)
    ratio = search_clip(w, gram, scheme, 20)
    plain = quantize_clipped(w, scheme)
    clipped = quantize_clipped(w, scheme, ratio)
    err_plain = cell_errors(w - P.dequantize(*plain), gram, scheme)
    err_clip = cell_errors(w - P.dequantize(*clipped), gram, scheme)
    assert ratio.shape == plain[1].shape
    assert bool((ratio >= 0.5).all() and (ratio <= 1.0).all())
    assert bool((err_clip <= err_plain * (1 + 1e-6)).all())
    assert float(err_clip.sum()) < float(err_plain.sum())


def test_cell_errors_add_up_for_per_channel_cells() -> None:
    x, d = outlier_inputs(), weight()
    cells = cell_errors(
        d, x.T @ x, Scheme(symmetric=False)
    )  # (N_OUT, 1): whole rows, nothing left out
    assert cells.shape == (N_OUT, 1)
    assert float(cells.sum()) == pytest.approx(output_error(d, x.T @ x), rel=1e-4)


@pytest.mark.parametrize(("key", "value"), [("n_grid", 0), ("max_rows", 0), ("clip", "yes")])
def test_config_ranges(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"quantize.awq.{key}: got"):
        AWQConfig(**{key: value})


# -- the handler ---------------------------------------------------------------------------
class Net(nn.Module):
    """An embedding and a repeated pair of linears fed inputs with a few large channels."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, K)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(K, K), nn.ReLU()), nn.Sequential(nn.Linear(K, K), nn.ReLU())
        )
        self.head = nn.Linear(K, 8)
        self.boost = nn.Parameter(torch.ones(K), requires_grad=False)
        self.boost[:4] = 30.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(ids) * self.boost))


def data(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 30, (4, 6), generator=g) for _ in range(n)]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def out(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b) for b in batches])


def test_handler_stores_input_scaled_layers_and_beats_rtn(net: Net) -> None:
    calib = data()
    rtn = slimkit.compress(copy.deepcopy(net), {"name": "r", "stages": [{"quantize": W4G}]})
    q = slimkit.compress(copy.deepcopy(net), awq(W4G), data=calib)
    first = q.blocks[0][0]
    assert isinstance(first, QuantLinear) and first.in_scale is not None
    assert isinstance(q.emb, QuantEmbedding) and torch.equal(q.emb.codes, rtn.emb.codes)
    dense = P.dequantize(first.codes, first.scale, first.zero_point) * first.in_scale
    assert torch.equal(first.dense_weight(), dense)
    assert float(first.in_scale[:4].max()) < float(first.in_scale[4:].min())  # big inputs
    ref = out(net, calib)
    err_awq = float(((out(q, calib) - ref) ** 2).mean())
    assert err_awq < 0.7 * float(((out(rtn, calib) - ref) ** 2).mean())


def test_conv_gets_one_scale_per_input_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 2))
    x = torch.randn(3, 4, 5, 5)
    x[:, 0] *= 30.0
    # groups of 8 columns span two input channels (2 x 2 kernel): scaling can help
    cfg = {"bits": 4, "granularity": "per_group", "group_size": 8, "symmetric": False}
    q = slimkit.compress(copy.deepcopy(model), awq(cfg), data=[x])
    conv = q[0]
    assert isinstance(conv, QuantConv2d) and conv.in_scale is not None
    assert conv.in_scale.shape == (4,) and float(conv.in_scale[0]) < float(conv.in_scale[1:].min())
    with torch.no_grad():
        rtn = QuantConv2d.from_float(model[0], bits=4, symmetric=False, group_size=8)
        ref = model(x)
        assert float(((conv(x) - ref) ** 2).mean()) < float(((rtn(x) - ref) ** 2).mean())


def test_group_size_not_dividing_gives_a_short_last_group(net: Net) -> None:
    q = slimkit.compress(net, awq({**W4G, "group_size": 24}), data=data())
    for layer in (q.blocks[0][0], q.head, q.emb):  # 64 inputs: groups of 24, 24 and 16
        assert isinstance(layer, QuantLinear | QuantEmbedding) and layer.scale.shape[1] == 3
    assert bool(torch.isfinite(out(q, data())).all())


def test_no_calibration_data_is_data_error(net: Net) -> None:
    with pytest.raises(DataError, match="awq needs calibration data"):
        slimkit.compress(net, awq(W4G))
    assert type(net.head) is nn.Linear


def test_nan_in_calibration_input_is_data_error_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    x[0, 0] = float("inf")
    with pytest.raises(DataError, match=r"layer '0' hold Inf"):
        slimkit.compress(model, awq({"bits": 4}), data=[x])
    assert type(model[0]) is nn.Linear


def test_save_load_round_trip_is_bit_exact(net: Net, tmp_path: Path) -> None:
    calib = data()
    q = slimkit.compress(net, awq(W4G), data=calib)
    y = out(q, calib)
    slimkit.save(q, tmp_path / "a")
    torch.manual_seed(99)
    loaded = slimkit.load(tmp_path / "a", model=Net())
    assert torch.equal(out(loaded, calib), y)
    assert loaded.blocks[0][0].in_scale is not None
