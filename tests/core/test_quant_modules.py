"""Quantized layers: error bounds against the float layer, spec round trips, rtn swaps."""

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.compressed import count_params, module_class
from slimkit.errors import ConfigError
from slimkit.formats import primitives as P
from slimkit.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.recipe import shipped_dir

QUANT = [
    pytest.param({}, id="int8-sym-channel"),
    pytest.param({"per_channel": False}, id="int8-sym-tensor"),
    pytest.param({"symmetric": False}, id="int8-asym-channel"),
    pytest.param({"symmetric": False, "per_channel": False}, id="int8-asym-tensor"),
    pytest.param({"bits": 4}, id="int4-sym-channel"),
]
W8 = {"name": "w8", "stages": [{"quantize": {"bits": 8, "granularity": "per_channel"}}]}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def row_scales(q: QuantLinear | QuantConv2d | QuantEmbedding) -> torch.Tensor:
    """The scale of every output row, shape (C,)."""
    return q.scale.reshape(-1).expand(q.codes.shape[0]).clone()


def rebuilt(q: nn.Module) -> nn.Module:
    """A module rebuilt from ``q``'s spec and filled from its state dict."""
    cls = module_class(type(q).__name__)
    assert cls is type(q)
    fresh = cls.from_spec(q.spec())
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in q.state_dict().items()
    }
    assert {k: v.dtype for k, v in fresh.state_dict().items()} == {
        k: v.dtype for k, v in q.state_dict().items()
    }
    fresh.load_state_dict(q.state_dict())
    return fresh


# -- Linear --------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_error_bound(quant: dict[str, Any], bias: bool) -> None:
    m = nn.Linear(16, 6, bias=bias)
    q = QuantLinear.from_float(m, **quant)
    x = torch.randn(5, 16)
    y, yq = m(x), q(x)
    # each weight is off by at most scale/2 of its row: |dy_i| <= scale_i / 2 * sum_j |x_j|
    bound = x.abs().sum(1, keepdim=True) * row_scales(q) / 2
    assert bool(((yq - y).abs() <= bound * (1 + 1e-3) + 1e-6).all())
    assert (
        float((q.dense_weight() - m.weight.detach()).abs().max())
        <= float(q.scale.max()) / 2 * 1.001
    )
    if bias:
        assert torch.equal(q.bias, m.bias)
    else:
        assert q.bias is None


def test_linear_int8_relative_error_small() -> None:
    m = nn.Linear(64, 32)
    q = QuantLinear.from_float(m)
    x = torch.randn(8, 64)
    with torch.no_grad():
        y, yq = m(x), q(x)
    assert float((yq - y).abs().max()) <= 1e-2 * float(y.abs().max())


def test_linear_storage() -> None:
    m = nn.Linear(7, 3)
    q = QuantLinear.from_float(m)
    assert q.codes.dtype == torch.int8 and q.codes.shape == (3, 7)
    assert q.scale.shape == (3, 1)
    assert q.zero_point is None
    assert "zero_point" not in q.state_dict()
    assert q.n_params() == m.weight.numel() == 21
    qa = QuantLinear.from_float(m, symmetric=False, per_channel=False)
    assert qa.scale.shape == (1, 1) and qa.zero_point is not None
    assert qa.zero_point.shape == (1, 1)


def test_linear_dense_weight_is_fake_quant() -> None:
    m = nn.Linear(9, 4)
    q = QuantLinear.from_float(m, symmetric=False)
    assert torch.equal(q.dense_weight(), P.fake_quantize(m.weight.detach(), 8, False, True))


@pytest.mark.parametrize("quant", QUANT)
def test_linear_spec_round_trip(quant: dict[str, Any]) -> None:
    q = QuantLinear.from_float(nn.Linear(10, 4), **quant)
    spec = q.spec()
    assert spec["in_features"] == 10 and spec["out_features"] == 4 and spec["bias"] is True
    assert spec["bits"] == quant.get("bits", 8)
    fresh = rebuilt(q)
    x = torch.randn(3, 10)
    assert torch.equal(fresh(x), q(x))


def test_linear_zero_weight_row_exact() -> None:
    m = nn.Linear(5, 3)
    with torch.no_grad():
        m.weight[1] = 0
        m.weight[0, 2] = 0
    q = QuantLinear.from_float(m, symmetric=False)
    w = q.dense_weight()
    assert torch.equal(w[1], torch.zeros(5))
    assert float(w[0, 2]) == 0.0


# -- Conv2d --------------------------------------------------------------------------------
CONVS = [
    pytest.param(dict(in_channels=3, out_channels=5, kernel_size=3), id="plain"),
    pytest.param(
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
        id="groups2-stride2-pad1",
    ),
    pytest.param(
        dict(in_channels=2, out_channels=4, kernel_size=(1, 3), padding=(0, 2), dilation=2),
        id="rect-dilated",
    ),
    pytest.param(dict(in_channels=2, out_channels=2, kernel_size=2, bias=False), id="no-bias"),
]


@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("conv_args", CONVS)
def test_conv_error_bound(conv_args: dict[str, Any], quant: dict[str, Any]) -> None:
    m = nn.Conv2d(**conv_args)
    q = QuantConv2d.from_float(m, **quant)
    assert q.codes.shape == m.weight.shape
    x = torch.randn(2, m.in_channels, 9, 9)
    y, yq = m(x), q(x)
    assert yq.shape == y.shape
    # |dy| <= scale/2 * (conv of |x| with an all-ones kernel), per output channel
    ones = F.conv2d(
        x.abs(), torch.ones_like(m.weight), None, m.stride, m.padding, m.dilation, m.groups
    )
    bound = ones * row_scales(q).reshape(1, -1, 1, 1) / 2
    assert bool(((yq - y).abs() <= bound * (1 + 1e-3) + 1e-6).all())
    assert q.n_params() == m.weight.numel()


@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("conv_args", CONVS)
def test_conv_spec_round_trip(conv_args: dict[str, Any], quant: dict[str, Any]) -> None:
    m = nn.Conv2d(**conv_args)
    q = QuantConv2d.from_float(m, **quant)
    spec = q.spec()
    assert spec["groups"] == m.groups
    assert tuple(spec["stride"]) == m.stride and tuple(spec["padding"]) == m.padding
    fresh = rebuilt(q)
    x = torch.randn(2, m.in_channels, 7, 7)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda: nn.Conv2d(2, 2, 3, padding="same"), id="padding-same"),
        pytest.param(lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), id="reflect"),
    ],
)
def test_conv_unsupported_padding_refused(conv: Any) -> None:
    with pytest.raises(ValueError, match="padding"):
        QuantConv2d.from_float(conv())
    model = nn.Sequential(conv())
    with pytest.raises(ConfigError, match=r"layer '0' cannot be quantized by rtn: padding"):
        slimkit.compress(model, W8)


# -- Embedding -----------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("padding_idx", [None, 0, 3])
def test_embedding_error_bound(quant: dict[str, Any], padding_idx: int | None) -> None:
    m = nn.Embedding(12, 6, padding_idx=padding_idx)
    q = QuantEmbedding.from_float(m, **quant)
    idx = torch.tensor([[0, 1, 3], [11, 3, 5]])
    y, yq = m(idx), q(idx)
    assert yq.shape == y.shape and yq.dtype == torch.float32
    bound = row_scales(q)[idx].unsqueeze(-1) / 2
    assert bool(((yq - y).abs() <= bound * (1 + 1e-3) + 1e-7).all())
    # looking rows up equals dequantizing the whole table first
    assert torch.equal(yq, F.embedding(idx, q.dense_weight()))
    if padding_idx is not None:
        assert q.padding_idx == padding_idx
        assert torch.equal(q(torch.tensor([padding_idx])), torch.zeros(1, 6))
    assert q.n_params() == m.weight.numel()


@pytest.mark.parametrize("quant", QUANT)
def test_embedding_spec_round_trip(quant: dict[str, Any]) -> None:
    q = QuantEmbedding.from_float(nn.Embedding(9, 4, padding_idx=2), **quant)
    assert q.spec()["padding_idx"] == 2
    fresh = rebuilt(q)
    assert fresh.padding_idx == 2
    idx = torch.arange(9)
    assert torch.equal(fresh(idx), q(idx))


def test_embedding_max_norm_refused() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        QuantEmbedding.from_float(nn.Embedding(4, 2, max_norm=1.0))
    with pytest.raises(ConfigError, match="layer 'e'"):
        slimkit.compress(nn.ModuleDict({"e": nn.Embedding(4, 2, max_norm=1.0)}), W8)


# -- compress with rtn ---------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, img: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx) + self.conv(img).mean((2, 3)).unsqueeze(1)
        h = self.norm(self.blocks(h))
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


def mixed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 1, 5, 5, generator=g), torch.randint(0, 10, (2, 4), generator=g)


def test_compress_w8_swaps_exactly_linear_conv_embedding() -> None:
    model = Mixed().eval()
    ref = copy.deepcopy(model)
    out = slimkit.compress(model, W8)
    assert out is model
    types = {n: type(m) for n, m in model.named_modules() if n}
    assert types["emb"] is QuantEmbedding
    assert types["conv"] is QuantConv2d
    assert types["blocks.0"] is QuantLinear and types["blocks.2"] is QuantLinear
    assert types["head"] is QuantLinear
    assert types["norm"] is nn.LayerNorm
    assert types["attn"] is nn.MultiheadAttention
    assert type(model.attn.out_proj) is type(ref.attn.out_proj)  # a Linear subclass: kept
    assert torch.equal(model.attn.out_proj.weight, ref.attn.out_proj.weight)
    assert torch.equal(model.norm.weight, ref.norm.weight)
    # weights of swapped layers are their quantized versions, row by row
    assert torch.equal(
        model.head.dense_weight(), P.fake_quantize(ref.head.weight.detach(), 8, True, True)
    )
    n_quant = sum(
        isinstance(m, QuantLinear | QuantConv2d | QuantEmbedding) for m in model.modules()
    )
    assert n_quant == 5
    x = mixed_inputs()
    with torch.no_grad():
        y, yq = ref(*x), model(*x)
    assert float((y - yq).abs().max()) <= 2e-2 * float(y.abs().max())


def test_compress_shipped_w8_file_equals_dict() -> None:
    a = Mixed().eval()
    b = copy.deepcopy(a)
    slimkit.compress(a, shipped_dir() / "w8-rtn.yaml")
    slimkit.compress(b, W8)
    x = mixed_inputs()
    with torch.no_grad():
        assert torch.equal(a(*x), b(*x))


def test_compress_respects_ignore() -> None:
    model = Mixed().eval()
    ref = copy.deepcopy(model)
    recipe = {"name": "w8", "stages": [{"quantize": {"targets": ["*"], "ignore": ["head", "emb"]}}]}
    slimkit.compress(model, recipe)
    assert type(model.head) is nn.Linear and torch.equal(model.head.weight, ref.head.weight)
    assert type(model.emb) is nn.Embedding and torch.equal(model.emb.weight, ref.emb.weight)
    assert type(model.conv) is QuantConv2d
    assert type(model.blocks[0]) is QuantLinear


def test_compress_targets_subset_per_tensor() -> None:
    model = Mixed().eval()
    recipe = {
        "name": "some",
        "stages": [{"quantize": {"targets": ["blocks.*"], "granularity": "per_tensor"}}],
    }
    slimkit.compress(model, recipe)
    assert type(model.blocks[0]) is QuantLinear and type(model.blocks[2]) is QuantLinear
    assert not model.blocks[0].per_channel and model.blocks[0].scale.shape == (1, 1)
    assert type(model.head) is nn.Linear and type(model.conv) is nn.Conv2d


def test_count_params_counts_represented_weights() -> None:
    model = Mixed().eval()
    before = count_params(model)
    slimkit.compress(model, W8)
    assert count_params(model) == before


class SharedModule(nn.Module):
    """One Linear registered under two names (applied twice)."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(4, 4)
        self.a = lin
        self.b = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_shared_module_quantized_under_every_name() -> None:
    model = SharedModule()
    slimkit.compress(model, W8)
    assert type(model.a) is QuantLinear
    assert type(model.b) is QuantLinear
