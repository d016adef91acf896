"""Ragged quantization groups: a ``group_size`` that does not divide a row's K inputs gives
``ceil(K / group_size)`` groups, the last one shorter, for every grouped method."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import slimkit
from slimkit.calib.hessian import accumulate_hessian
from slimkit.config import Granularity
from slimkit.formats import primitives as P
from slimkit.formats.affine import AffineFormat
from slimkit.formats.base import Scheme
from slimkit.formats.nf4 import LEVELS, NF4Format
from slimkit.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.layers.weight import FormatConv2d, FormatLinear
from slimkit.quant.awq import awq_quantize, cell_errors
from slimkit.quant.gptq import gptq_quantize
from slimkit.quant.mixed import proxy_error
from tests.ragged_toys import RaggedToy, ragged_toy

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
# slack for float32 rounding in x / scale and (q - z) * scale: |q - z| <= 255 codes
EPS = 1e-4
NF4_GAP = float(LEVELS.diff().max())

finite = st.floats(
    -1e3, 1e3, allow_nan=False, allow_infinity=False, width=32, allow_subnormal=False
)
elements = st.one_of(finite, st.just(0.0), st.sampled_from([1.0, -1.0, 0.5, 2.0**-10]))


@st.composite
def ragged(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """A (C, K) weight and a group size that does not divide K (at most K + 3)."""
    c, k = draw(st.integers(1, 5)), draw(st.integers(2, 40))
    g = draw(st.integers(2, k + 3))
    assume(k % g != 0)
    w = draw(hnp.arrays(np.float32, (c, k), elements=elements))
    return torch.from_numpy(w), g


def column_groups(k: int, g: int) -> torch.Tensor:
    """The group of each of ``k`` inputs, computed independently: (K,)."""
    return torch.tensor([j // g for j in range(k)])


# -- primitives ------------------------------------------------------------------------------
@SETTINGS
@given(wg=ragged(), bits=st.integers(2, 8), symmetric=st.booleans())
def test_every_value_is_within_half_its_groups_step(
    wg: tuple[torch.Tensor, int], bits: int, symmetric: bool
) -> None:
    w, g = wg
    c, k = w.shape
    scale, zero = P.qparams(w, bits, symmetric, group_size=g)
    assert scale.shape == zero.shape == (c, math.ceil(k / g))
    assert bool(torch.isfinite(scale).all() and (scale > 0).all())
    codes = P.quantize(w, scale, zero, bits, symmetric, group_size=g)
    qmin, qmax = P.qrange(bits, symmetric)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    dq = P.dequantize(codes, scale, None if symmetric else zero, group_size=g)
    col = column_groups(k, g)
    step = scale[:, col].double()  # (C, K): each value's own group's scale
    # round to nearest within range: every value is off by at most half its group's step
    err = (dq.double() - w.double()).abs()
    assert bool((err <= step * (0.5 + EPS)).all()), float((err - step / 2).max())
    # on the grid of its group: (code - zero) * scale, exactly
    z = torch.zeros_like(step) if symmetric else zero[:, col].double()
    assert torch.equal(dq.double(), ((codes.double() - z) * step).float().double())
    assert bool((dq[w == 0] == 0).all())  # exact zeros stay exact
    assert torch.equal(P.fake_quantize(w, bits, symmetric, group_size=g), dq)


@SETTINGS
@given(wg=ragged(), bits=st.integers(2, 8), symmetric=st.booleans(), data=st.data())
def test_each_groups_parameters_come_from_its_own_values_only(
    wg: tuple[torch.Tensor, int], bits: int, symmetric: bool, data: st.DataObject
) -> None:
    w, g = wg
    k = w.shape[1]
    scale, zero = P.qparams(w, bits, symmetric, group_size=g)
    n = scale.shape[1]
    for j in range(n):  # each group, the short last one included, on its own
        own = P.qparams(w[:, j * g : (j + 1) * g], bits, symmetric, per_channel=True)
        assert torch.equal(scale[:, j : j + 1], own[0]) and torch.equal(zero[:, j : j + 1], own[1])
    last = k - (n - 1) * g
    assert 0 < last < g
    if n == 1:  # one short group: nothing lies outside it
        return
    # a value outside the last group changes nothing of the last group
    i = data.draw(st.integers(0, (n - 1) * g - 1))
    moved = w.clone()
    moved[:, i] = data.draw(st.sampled_from([1e3, -1e3, 0.0]))
    scale2, zero2 = P.qparams(moved, bits, symmetric, group_size=g)
    assert torch.equal(scale2[:, -1], scale[:, -1]) and torch.equal(zero2[:, -1], zero[:, -1])


@SETTINGS
@given(
    c=st.integers(1, 4),
    n=st.integers(1, 4),
    g=st.integers(1, 9),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_path_equals_the_reshape_path_bit_for_bit_when_dividing(
    c: int, n: int, g: int, bits: int, symmetric: bool, seed: int
) -> None:
    w = torch.randn(c, n * g, generator=torch.Generator().manual_seed(seed)) * 3
    scale, zero = P.qparams(w, bits, symmetric, group_size=g)
    # the (R, G, n) reshape of before ragged groups existed
    parts = w.reshape(c, n, g)
    qmin, qmax = P.qrange(bits, symmetric)
    old = torch.clamp(torch.round(parts / scale[..., None]) + zero[..., None], qmin, qmax)
    old_codes = old.to(torch.int8).reshape(w.shape)
    old_dq = ((old_codes.reshape(c, n, g).float() - zero[..., None]) * scale[..., None]).reshape(
        w.shape
    )
    codes = P.quantize(w, scale, zero, bits, symmetric, group_size=g)
    assert torch.equal(codes, old_codes)
    assert torch.equal(P.quantize(w, scale, zero, bits, symmetric), old_codes)
    dq = P.dequantize(codes, scale, zero, group_size=g)
    assert torch.equal(dq, old_dq) and torch.equal(P.dequantize(codes, scale, zero), old_dq)


def test_group_view_pads_with_the_groups_own_last_value() -> None:
    w = torch.arange(14.0).reshape(2, 7)
    v = P.group_view(w, True, 3)  # groups of 3, 3 and 1
    assert v.shape == (2, 3, 3)
    assert v[0, 2].tolist() == [6.0, 6.0, 6.0] and v[1, 2].tolist() == [13.0, 13.0, 13.0]
    assert torch.equal(v.reshape(2, 9)[:, :7], w)


def test_parameters_that_do_not_fit_the_groups_are_refused() -> None:
    w = torch.randn(3, 10)
    scale, zero = P.qparams(w, 4, False, group_size=4)  # (3, 3)
    with pytest.raises(ValueError, match=r"do not fit rows of 10 inputs in groups of 5"):
        P.quantize(w, scale, zero, 4, False, group_size=5)  # 2 groups, not 3
    with pytest.raises(ValueError, match="does not fit a tensor of 30 values"):
        P.dequantize(torch.zeros(30, dtype=torch.int8), torch.ones(4, 1), None, group_size=4)


def test_smollm2_hidden_size_in_groups_of_128() -> None:
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    fmt = AffineFormat((8, 576), 4, False, Granularity.PER_GROUP, 128)
    t = fmt.encode(w)
    assert t["scale"].shape == (8, 5)  # 4 groups of 128, then one of 64
    err = (fmt.decode(t) - w).abs()
    assert bool((err <= t["scale"][:, column_groups(576, 128)] * (0.5 + EPS)).all())


# -- formats -------------------------------------------------------------------------------
@SETTINGS
@given(
    wg=ragged(),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    conv=st.booleans(),
)
def test_affine_format_stores_ragged_groups_exactly(
    wg: tuple[torch.Tensor, int], bits: int, symmetric: bool, conv: bool
) -> None:
    w, g = wg
    if conv:  # a Conv2d-like weight with the same flattened rows
        w = w.reshape(w.shape[0], w.shape[1], 1, 1)
    fmt = AffineFormat(tuple(w.shape), bits, symmetric, Granularity.PER_GROUP, g)
    t = fmt.encode(w)
    layout = fmt.layout()
    for name, tensor in t.items():
        slot = layout[name]
        assert slot is not None and tuple(tensor.shape) == slot.shape, name
    assert t["scale"].shape == (w.shape[0], math.ceil(w[0].numel() / g))
    dq = fmt.decode(t)
    assert torch.equal(dq, P.fake_quantize(w, bits, symmetric, group_size=g))
    # codes, scales and zero points round-trip: decode -> codes -> the same stored tensors
    again = fmt.from_codes(fmt.unpack(t), t["scale"], t.get("zero_point"))
    assert again.keys() == t.keys() and all(torch.equal(again[n], t[n]) for n in t)
    stream = fmt.from_streams(t, [s.symbols for s in fmt.streams(t)])
    assert torch.equal(stream["qweight"], t["qweight"])


@SETTINGS
@given(wg=ragged())
def test_nf4_ragged_round_trip(wg: tuple[torch.Tensor, int]) -> None:
    w, g = wg
    c, k = w.shape
    fmt = NF4Format((c, k), Granularity.PER_GROUP, g)
    t = fmt.encode(w)
    n = math.ceil(k / g)
    assert t["scale"].shape == (c, n) and tuple(t["indices"].shape) == (math.ceil(c * k / 2),)
    col = column_groups(k, g)
    for j in range(n):  # the absmax of the group's real values only (1 for an all-zero group)
        absmax = w[:, col == j].abs().amax(dim=1)
        assert torch.equal(t["scale"][:, j], torch.where(absmax > 0, absmax, 1.0))
    dq = fmt.decode(t)
    scale = t["scale"][:, col]  # (C, K)
    assert bool(((dq - w).abs() <= scale * NF4_GAP / 2 + 1e-6 * scale).all())
    # one level index per real weight, and the stored tensors are a fixed point
    assert fmt.unpack(t).shape == (c * k,)
    back = fmt.encode(dq)
    assert torch.equal(back["scale"], t["scale"]) and torch.equal(back["indices"], t["indices"])
    assert torch.equal(fmt.decode(back), dq)


def test_nf4_matches_the_reshape_when_dividing() -> None:
    w = torch.randn(6, 48, generator=torch.Generator().manual_seed(3))
    fmt = NF4Format((6, 48), Granularity.PER_GROUP, 16)
    t = fmt.encode(w)
    groups = w.reshape(6, 3, 16)
    assert torch.equal(t["scale"], groups.abs().amax(dim=2))
    idx = fmt.unpack(t).reshape(6, 3, 16)
    assert torch.equal(fmt.decode(t), (LEVELS[idx] * t["scale"][..., None]).reshape(6, 48))


# -- GPTQ and AWQ --------------------------------------------------------------------------
N_OUT, K, G = 16, 72, 32  # groups of 32, 32 and 8


def correlated(n: int = 400, k: int = K, rank: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g)
    return x + 0.05 * torch.randn(n, k, generator=g)


def weight(seed: int = 1, o: int = N_OUT, k: int = K) -> torch.Tensor:
    return torch.randn(o, k, generator=torch.Generator().manual_seed(seed))


def out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).sum())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_on_ragged_groups_beats_rtn(act_order: bool, symmetric: bool) -> None:
    x, w = correlated(), weight()
    h, _ = accumulate_hessian(torch.zeros(K, K), 0, x)
    codes, scale, zero = gptq_quantize(w, h, 4, symmetric, group_size=G, act_order=act_order)
    assert codes.shape == (N_OUT, K) and scale.shape == (N_OUT, 3)
    assert (zero is None) == symmetric
    qmin, qmax = P.qrange(4, symmetric)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    w_hat = P.dequantize(codes, scale, zero, group_size=G)
    rtn = P.fake_quantize(w, 4, symmetric, group_size=G)
    assert out_err(x, w, w_hat) <= out_err(x, w, rtn)


def test_gptq_with_a_diagonal_hessian_is_rtn_on_ragged_groups_in_any_order() -> None:
    # a diagonal H spreads no error: with act_order the short last group's columns are
    # visited out of order, yet its parameters and codes must be exactly those of rounding
    w = weight()
    h = torch.diag(torch.linspace(0.1, 5.0, K).flip(0).roll(17))
    for act_order in (False, True):
        codes, scale, zero = gptq_quantize(w, h, 4, False, group_size=G, act_order=act_order)
        want_scale, want_zero = P.qparams(w, 4, False, group_size=G)
        assert torch.equal(scale, want_scale) and torch.equal(zero, want_zero)  # type: ignore[arg-type]
        assert torch.equal(codes, P.quantize(w, want_scale, want_zero, 4, False, group_size=G))


@pytest.mark.parametrize("clip", [False, True])
def test_awq_on_ragged_groups_beats_rtn(clip: bool) -> None:
    x, w = correlated(), weight()
    x[:, :4] *= 30.0  # a few large input channels
    scheme = Scheme(4, Granularity.PER_GROUP, G, symmetric=False)
    codes, scale, zero, s = awq_quantize(w, x.T @ x, x.abs().mean(0), scheme, n_grid=10, clip=clip)
    assert codes.shape == (N_OUT, K) and scale.shape == (N_OUT, 3) and s.shape == (K,)
    w_hat = P.dequantize(codes, scale, zero, group_size=G) / s
    rtn = P.fake_quantize(w, 4, False, group_size=G)
    assert out_err(x, w, w_hat) <= out_err(x, w, rtn) * (1 + 1e-6)


def test_cell_errors_of_ragged_groups_are_each_groups_own_share() -> None:
    x, d = correlated(), weight()
    gram = x.T @ x
    scheme = Scheme(4, Granularity.PER_GROUP, G, symmetric=False)
    cells = cell_errors(d, gram, scheme)
    assert cells.shape == (N_OUT, 3)
    for j, (a, b) in enumerate([(0, 32), (32, 64), (64, 72)]):
        own = ((d[:, a:b] @ gram[a:b, a:b]) * d[:, a:b]).sum(dim=1)
        assert torch.allclose(cells[:, j], own, rtol=1e-4, atol=1e-3)


def test_mixed_proxy_error_takes_ragged_groups() -> None:
    w = weight()
    quant: dict[str, Any] = {"symmetric": False, "per_channel": True, "group_size": G}
    err = w - P.fake_quantize(w, 3, False, group_size=G)
    assert proxy_error(w, None, 3, quant) == pytest.approx(float((err * err).sum()), rel=1e-6)
    assert proxy_error(w, None, 3, quant) > proxy_error(w, None, 6, quant)


# -- layers and handlers -------------------------------------------------------------------
class Toy(RaggedToy):
    """The ragged toy and an Embedding of dimension 40 (groups of 32 and 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 40)


def toy() -> Toy:
    return ragged_toy(Toy)  # type: ignore[return-value]


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(40, 5, 6, 6, generator=g) for _ in range(2)]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("rtn", {}),
        ("gptq", {"act_order": True}),
        ("awq", {"n_grid": 5}),
        ("rtn", {"format": "nf4"}),
    ],
    ids=["rtn", "gptq", "awq", "nf4"],
)
def test_handlers_quantize_ragged_layers(method: str, extra: dict[str, Any]) -> None:
    symmetric = extra.get("format") == "nf4"
    options = {"method": method, "bits": 4, "granularity": "per_group", "group_size": 32}
    options.update({"symmetric": symmetric, **extra})
    data = calibration()
    q = slimkit.compress(toy(), {"stages": [{"quantize": options}]}, data=data)
    assert isinstance(q.fc, QuantLinear | FormatLinear) and q.fc.scale.shape == (16, 3)
    assert isinstance(q.conv, QuantConv2d | FormatConv2d) and q.conv.scale.shape == (8, 2)
    ref = toy()
    with torch.no_grad():
        x = data[0]
        want, got = ref(x), q(x)
    assert float(((got - want) ** 2).mean()) < 0.05 * float((want**2).mean())


def test_quantized_embedding_looks_up_ragged_rows_exactly() -> None:
    emb = nn.Embedding(10, 40)
    for symmetric in (True, False):
        q = QuantEmbedding.from_float(emb, bits=4, symmetric=symmetric, group_size=32)
        assert q.scale.shape == (10, 2)  # groups of 32 and 8
        idx = torch.tensor([[3, 0, 9], [9, 9, 1]])
        with torch.no_grad():
            assert torch.equal(q(idx), F.embedding(idx, q.dense_weight()))


def test_static_and_mixed_take_ragged_groups() -> None:
    data = calibration()
    grouped = {"granularity": "per_group", "group_size": 32, "symmetric": False}
    mixed = {"method": "mixed", "avg_bits": 5, "candidates": [4, 6], "quantizer": "rtn", **grouped}
    q = slimkit.compress(toy(), {"stages": [{"quantize": mixed}]}, data=data)
    assert q.fc.scale.shape == (16, 3) and q.conv.scale.shape == (8, 2)
    static = {"method": "w8a8-static", **grouped}
    q = slimkit.compress(copy.deepcopy(toy()), {"stages": [{"quantize": static}]}, data=data)
    assert q.fc.scale.shape == (16, 3)
