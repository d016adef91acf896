"""Quantization math: error bounds, code ranges, exact zeros, granularity, binary/ternary."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slimkit.formats import primitives as P

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# slack for float32 rounding in x / scale and (q - z) * scale: |q - z| <= 255 codes
EPS = 1e-4

finite = st.floats(
    min_value=-1e3,
    max_value=1e3,
    allow_nan=False,
    allow_infinity=False,
    width=32,
    allow_subnormal=False,
)
# values with a share of exact zeros and repeated values
elements = st.one_of(finite, st.just(0.0), st.sampled_from([1.0, -1.0, 0.5, 2.0**-10]))
shapes = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5)
weights = hnp.arrays(np.float32, shapes, elements=elements)
bits_any = st.integers(min_value=2, max_value=8)


@st.composite
def weight_and_granularity(draw: st.DrawFn) -> tuple[np.ndarray, bool, int | None]:
    """A weight and (per_channel, group_size): per tensor, per channel or a dividing group."""
    w = draw(weights)
    k = math.prod(w.shape[1:])
    mode = draw(st.sampled_from(["tensor", "channel", "group"]))
    if mode == "group":
        return w, True, draw(st.sampled_from([d for d in range(1, k + 1) if k % d == 0]))
    return w, mode == "channel", None


def param_shape(shape: tuple[int, ...], per_channel: bool, group_size: int | None) -> tuple:
    k = math.prod(shape[1:])
    if group_size is not None:
        return (shape[0], k // group_size)
    return (shape[0], 1) if per_channel else (1, 1)


def roundtrip(
    w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, zero = P.qparams(w, bits, symmetric, per_channel, group_size)
    codes = P.quantize(w, scale, zero, bits, symmetric)
    dq = P.dequantize(codes, scale, None if symmetric else zero)
    return scale, zero, codes, dq


def check_roundtrip(
    w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool, group_size: int | None = None
) -> None:
    scale, zero, codes, dq = roundtrip(w, bits, symmetric, per_channel, group_size)
    r, g = param_shape(tuple(w.shape), per_channel, group_size)
    qmin, qmax = P.qrange(bits, symmetric)

    assert scale.shape == zero.shape == (r, g)
    assert scale.dtype == torch.float32
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    assert dq.shape == w.shape and dq.dtype == torch.float32
    # zero points are integers inside the code range; symmetric has none
    assert torch.equal(zero, torch.round(zero))
    assert float(zero.min()) >= qmin and float(zero.max()) <= qmax
    if symmetric:
        assert not bool(zero.any())

    # every value lies in [min, max] of its group, which the grid covers: error <= scale / 2
    err = (dq.double() - w.double()).abs().reshape(r, g, -1)  # (R, G, n)
    bound = scale.double()[..., None] * (0.5 + EPS)  # (R, G, 1)
    assert bool((err <= bound).all()), float((err - bound).max())

    # an exact zero dequantizes to exactly 0.0
    assert bool((dq[w == 0] == 0.0).all())

    # quantizing the dequantized tensor with the same parameters gives the same codes
    again = P.quantize(dq, scale, zero, bits, symmetric)
    assert torch.equal(again, codes)


@SETTINGS
@given(w=weights, symmetric=st.booleans(), per_channel=st.booleans())
def test_roundtrip_int8(w: np.ndarray, symmetric: bool, per_channel: bool) -> None:
    check_roundtrip(torch.from_numpy(w), 8, symmetric, per_channel)


@SETTINGS
@given(wg=weight_and_granularity(), bits=bits_any, symmetric=st.booleans())
def test_roundtrip_any_bits_and_granularity(
    wg: tuple[np.ndarray, bool, int | None], bits: int, symmetric: bool
) -> None:
    w, per_channel, group_size = wg
    check_roundtrip(torch.from_numpy(w), bits, symmetric, per_channel, group_size)


@SETTINGS
@given(wg=weight_and_granularity(), bits=bits_any, symmetric=st.booleans())
def test_fake_quantize_matches_roundtrip(
    wg: tuple[np.ndarray, bool, int | None], bits: int, symmetric: bool
) -> None:
    w, per_channel, group_size = wg
    t = torch.from_numpy(w)
    _, _, _, dq = roundtrip(t, bits, symmetric, per_channel, group_size)
    assert torch.equal(P.fake_quantize(t, bits, symmetric, per_channel, group_size), dq)


@SETTINGS
@given(w=weights, bits=bits_any, per_channel=st.booleans())
def test_symmetric_requantize_is_stable(w: np.ndarray, bits: int, per_channel: bool) -> None:
    """Fresh parameters from the dequantized tensor reproduce the same codes."""
    t = torch.from_numpy(w)
    _, _, codes, dq = roundtrip(t, bits, True, per_channel)
    _, _, codes2, dq2 = roundtrip(dq, bits, True, per_channel)
    assert torch.equal(codes2, codes)
    assert torch.allclose(dq2, dq, rtol=1e-6, atol=0)


@SETTINGS
@given(
    value=finite,
    c=st.integers(1, 4),
    k=st.sampled_from([1, 2, 4, 8]),
    bits=bits_any,
    symmetric=st.booleans(),
    granularity=st.sampled_from([(False, None), (True, None), (True, 1), (True, 2)]),
)
def test_constant_tensor(
    value: float,
    c: int,
    k: int,
    bits: int,
    symmetric: bool,
    granularity: tuple[bool, int | None],
) -> None:
    per_channel, group_size = granularity
    if group_size is not None and k % group_size:
        group_size = 1
    w = torch.full((c, k), value)
    scale, _, _, dq = roundtrip(w, bits, symmetric, per_channel, group_size)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    if value == 0.0:
        assert torch.equal(dq, torch.zeros_like(w))
        return
    r, g = scale.shape
    err = (dq.double() - w.double()).abs().reshape(r, g, -1)  # (R, G, n)
    assert bool((err <= scale.double()[..., None] * (0.5 + EPS)).all())
    if abs(value) > 1e-30:  # scales stay normal floats, so tinier values lose resolution
        # a constant is the end of its own range: represented up to float rounding
        assert torch.allclose(dq, w, rtol=1e-5, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [(False, None), (True, None), (True, 5), (True, 1)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_zero_gives_scale_one_and_exact_zeros(
    bits: int, symmetric: bool, granularity: tuple[bool, int | None]
) -> None:
    w = torch.zeros(3, 5)
    scale, _, codes, dq = roundtrip(w, bits, symmetric, *granularity)
    assert torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(dq, w)
    assert not bool(torch.signbit(dq).any())  # +0.0, not -0.0
    if symmetric:
        assert not bool(codes.any())


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_channel_beside_others(symmetric: bool) -> None:
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.0], [5.0, 5.0, 5.0]])
    scale, _, _, dq = roundtrip(w, 8, symmetric, per_channel=True)
    assert float(scale[0]) == 1.0
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    assert torch.equal(dq[0], torch.zeros(3))
    assert float(dq[1, 2]) == 0.0
    assert torch.allclose(dq[2], w[2], rtol=1e-6, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_and_constant_groups_beside_others(symmetric: bool) -> None:
    w = torch.tensor([[0.0, 0.0, 3.0, -1.0], [7.0, 7.0, -0.5, 0.25]])
    scale, _, _, dq = roundtrip(w, 4, symmetric, True, group_size=2)
    assert scale.shape == (2, 2)
    assert float(scale[0, 0]) == 1.0
    assert torch.equal(dq[0, :2], torch.zeros(2))
    assert torch.allclose(dq[1, :2], w[1, :2], rtol=1e-6, atol=0)


def test_symmetric_int8_scale_is_absmax_over_127() -> None:
    w = torch.tensor([[0.5, -2.54, 1.0], [0.1, 0.2, -0.05]])
    scale, zero = P.qparams(w, 8, True, True)
    assert torch.allclose(scale, torch.tensor([[2.54 / 127], [0.2 / 127]]))
    assert not bool(zero.any())
    codes = P.quantize(w, scale, zero, 8, True)
    assert codes[0, 1] == -127 and codes[1, 1] == 127
    per_tensor, _ = P.qparams(w, 8, True, False)
    assert per_tensor.shape == (1, 1)
    assert torch.allclose(per_tensor, torch.tensor([[2.54 / 127]]))


def test_asymmetric_uses_full_range_for_positive_weights() -> None:
    w = torch.tensor([[0.0, 1.0, 2.55]])
    scale, zero = P.qparams(w, 8, False, True)
    assert torch.allclose(scale, torch.tensor([[0.01]]))
    assert float(zero) == -128.0
    codes = P.quantize(w, scale, zero, 8, False)
    assert codes.tolist() == [[-128, -28, 127]]


@pytest.mark.parametrize(
    ("bits", "symmetric", "expected"),
    [(8, True, (-127, 127)), (8, False, (-128, 127)), (2, True, (-1, 1)), (4, False, (-8, 7))],
)
def test_qrange(bits: int, symmetric: bool, expected: tuple[int, int]) -> None:
    assert P.qrange(bits, symmetric) == expected


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_qrange_refuses_unsupported_bits(bits: int) -> None:
    with pytest.raises(ValueError, match=f"bits: got {bits}; allowed: 2..8"):
        P.qrange(bits, True)


def test_conv_shaped_weight_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2, 3, 3, generator=g)
    w[2] *= 100  # one large channel must not coarsen the others
    scale, _, codes, dq = roundtrip(w, 8, True, True)
    assert scale.shape == (4, 1)
    assert codes.shape == w.shape
    for ch in range(4):
        assert float((dq[ch] - w[ch]).abs().max()) <= float(scale[ch]) * (0.5 + EPS)
        assert float(scale[ch]) == pytest.approx(float(w[ch].abs().max()) / 127)


def test_conv_groups_run_along_flattened_input() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, 3, 3, generator=g)  # K = 36
    scale, _ = P.qparams(w, 4, True, group_size=12)
    assert scale.shape == (3, 3)
    flat = w.reshape(3, 36)
    for o in range(3):
        for j in range(3):
            absmax = float(flat[o, 12 * j : 12 * (j + 1)].abs().max())
            assert float(scale[o, j]) == pytest.approx(absmax / 7)


def test_group_of_whole_row_equals_per_channel() -> None:
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    for symmetric in (True, False):
        per_row = P.qparams(w, 4, symmetric, True)
        whole = P.qparams(w, 4, symmetric, group_size=8)
        assert torch.equal(per_row[0], whole[0]) and torch.equal(per_row[1], whole[1])


def test_group_size_overrides_per_channel() -> None:
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    a = P.qparams(w, 8, True, per_channel=False, group_size=3)
    b = P.qparams(w, 8, True, per_channel=True, group_size=3)
    assert a[0].shape == (2, 2) and torch.equal(a[0], b[0])


@pytest.mark.parametrize("group_size", [0, -2, 2.5, True, "8"])
def test_check_group_size_refuses(group_size: object) -> None:
    msg = f"group_size: got {group_size!r}; allowed: a positive integer"
    with pytest.raises(ValueError, match=re.escape(msg)):
        P.check_group_size(group_size)  # type: ignore[arg-type]


def test_check_group_size_accepts_any_positive_integer() -> None:
    for g in (1, 2, 3, 5, 7, 12, 128):
        P.check_group_size(g)


@pytest.mark.parametrize(
    ("k", "g", "n"), [(12, 4, 3), (12, 5, 3), (12, 12, 1), (12, 13, 1), (576, 128, 5)]
)
def test_n_groups_is_the_ceiling(k: int, g: int, n: int) -> None:
    assert P.n_groups(k, g) == n


def test_qparams_on_non_dividing_group_gives_a_short_last_group() -> None:
    w = torch.arange(24.0).reshape(2, 3, 4)  # K = 12: groups of 5, 5 and 2
    scale, zero = P.qparams(w, 8, False, group_size=5)
    assert scale.shape == zero.shape == (2, 3)
    last, _ = P.qparams(w.reshape(2, 12)[:, 10:], 8, False)  # the short group on its own
    assert torch.equal(scale[:, 2:], last)
    with pytest.raises(ValueError, match="group_size: got 0"):
        P.qparams(w, 4, True, group_size=0)


def test_out_of_range_values_clamp_to_end_codes() -> None:
    w = torch.tensor([[-1.0, 0.5, 1.0]])
    scale, zero = P.qparams(w, 4, False, True)
    codes = P.quantize(w * 10, scale, zero, 4, False)
    assert codes.tolist() == [[-8, 7, 7]]


def test_quantize_reads_0d_and_1d_parameters() -> None:
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    scale, zero = P.qparams(w, 8, False, True)  # (2, 1)
    codes = P.quantize(w, scale, zero, 8, False)
    assert torch.equal(P.quantize(w, scale[:, 0], zero[:, 0], 8, False), codes)
    assert torch.equal(
        P.dequantize(codes, scale[:, 0], zero[:, 0]), P.dequantize(codes, scale, zero)
    )
    s0, z0 = P.qparams(w, 8, True, False)
    assert torch.equal(
        P.quantize(w, s0.reshape(()), z0.reshape(()), 8, True), P.quantize(w, s0, z0, 8, True)
    )


def test_parameters_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        P.quantize(torch.ones(3, 4), torch.ones(5, 1), torch.zeros(5, 1), 8, True)
    with pytest.raises(ValueError, match="does not fit"):
        P.dequantize(torch.ones(3, 4, dtype=torch.int8), torch.ones(2, 5), None)


def test_empty_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        P.qparams(torch.zeros(0, 4), 8, True)


def test_fake_quantize_keeps_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 7, generator=g, dtype=torch.float64)
    fq = P.fake_quantize(w, 8, False, True)
    _, _, _, dq = roundtrip(w, 8, False, True)
    assert fq.dtype == torch.float64
    assert torch.equal(fq, dq.double())


# --- params_from_range --------------------------------------------------------------------

# the whole float32 range, subnormals included
wide = st.floats(allow_nan=False, allow_infinity=False, width=32)


@SETTINGS
@given(
    ends=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.just(2)), elements=wide),
    bits=bits_any,
    symmetric=st.booleans(),
)
def test_params_from_range_is_finite_positive_and_keeps_zero_exact(
    ends: np.ndarray, bits: int, symmetric: bool
) -> None:
    t = torch.from_numpy(ends)
    lo, hi = t.min(dim=1).values, t.max(dim=1).values  # (n,)
    scale, zero = P.params_from_range(lo, hi, bits, symmetric)
    qmin, qmax = P.qrange(bits, symmetric)
    assert scale.shape == zero.shape == lo.shape
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert torch.equal(zero, torch.round(zero))
    assert bool(((zero >= qmin) & (zero <= qmax)).all())
    if symmetric:
        assert not bool(zero.any())
    # 0.0 maps to the integer code ``zero`` and back to exactly 0.0
    codes = P.quantize(torch.zeros(lo.numel(), 3), scale[:, None], zero[:, None], bits, symmetric)
    assert torch.equal(
        P.dequantize(codes, scale[:, None], zero[:, None]), torch.zeros(lo.numel(), 3)
    )
    # both ends lie within half a step of the grid (the range is widened to hold 0); near
    # float32's max the grid's end codes could dequantize past it, so check ranges up to 1e38
    if float(t.abs().max()) > 1e38:
        return
    for end in (lo, hi):
        x = end[:, None].double()
        q = P.quantize(end[:, None], scale[:, None], zero[:, None], bits, symmetric)
        dq = P.dequantize(q, scale[:, None], zero[:, None]).double()
        assert bool(((dq - x).abs() <= scale[:, None].double() * (0.5 + EPS)).all())


def test_params_from_range_zero_width_gives_scale_one() -> None:
    z = torch.zeros(3)
    for symmetric in (True, False):
        scale, _ = P.params_from_range(z, z, 4, symmetric)
        assert torch.equal(scale, torch.ones(3))


def test_params_from_range_widens_to_include_zero() -> None:
    lo, hi = torch.tensor(2.0), torch.tensor(4.0)
    scale, zero = P.params_from_range(lo, hi, 8, False)
    assert float(scale) == pytest.approx(4.0 / 255)
    assert float(zero) == -128.0
    scale, _ = P.params_from_range(-hi, -lo, 8, True)
    assert float(scale) == pytest.approx(4.0 / 127)


def test_params_from_range_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        P.params_from_range(torch.tensor(float("nan")), torch.tensor(1.0), 8, True)
    with pytest.raises(ValueError, match="non-finite"):
        P.params_from_range(torch.tensor(0.0), torch.tensor(float("inf")), 8, False)
    with pytest.raises(ValueError, match="shapes differ"):
        P.params_from_range(torch.zeros(2), torch.zeros(3), 8, False)


# --- binary and ternary -------------------------------------------------------------------


def sq_error(rows: torch.Tensor, codes: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Squared error of ``alpha * codes`` against each row, for every alpha: (R, A)."""
    rec = alphas.double()[None, :, None] * codes.double()[:, None, :]  # (R, A, K)
    return (rows.double()[:, None, :] - rec).square().sum(dim=2)  # (R, A)


def check_l2_optimal(rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """No scalar on a fine grid reconstructs any row better than its own scale (R,) does."""
    if rows.numel() == 0:
        return
    grid = torch.linspace(0.0, float(rows.abs().max()) * 2 + 1e-6, 801)  # (A,)
    best = sq_error(rows, codes, grid).min(dim=1).values  # (R,)
    rec = scale.double()[:, None] * codes.double()  # (R, K)
    got = (rows.double() - rec).square().sum(dim=1)  # (R,)
    energy = rows.double().square().sum(dim=1)  # (R,) float32 rounding is relative to this
    assert bool((got <= best + 1e-6 * (1 + energy)).all())


@SETTINGS
@given(w=weights, per_channel=st.booleans())
def test_binarize(w: np.ndarray, per_channel: bool) -> None:
    t = torch.from_numpy(w)
    codes, scale = P.binarize(t, per_channel)
    r = t.shape[0] if per_channel else 1
    assert codes.dtype == torch.int8 and codes.shape == t.shape
    assert set(codes.unique().tolist()) <= {-1, 1}
    assert bool((codes[t == 0] == 1).all())
    assert bool((codes[t > 0] == 1).all()) and bool((codes[t < 0] == -1).all())
    assert scale.shape == (r, 1)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    rows = t.reshape(r, -1)
    live = rows.abs().sum(dim=1) > 0
    # closed form: mean |w| of the row
    assert torch.allclose(scale[live, 0], rows[live].abs().mean(dim=1), rtol=1e-6)
    check_l2_optimal(rows[live], codes.reshape(r, -1)[live], scale[live, 0])
    # dequantize works with zero=None
    assert torch.allclose(
        P.dequantize(codes, scale, None), codes.float().reshape(r, -1).mul(scale).reshape(t.shape)
    )


@SETTINGS
@given(
    w=weights,
    per_channel=st.booleans(),
    threshold=st.sampled_from([0.0, 0.5, 0.7, 1.0, 1.5]),
)
def test_ternarize(w: np.ndarray, per_channel: bool, threshold: float) -> None:
    t = torch.from_numpy(w)
    codes, scale = P.ternarize(t, per_channel, threshold)
    r = t.shape[0] if per_channel else 1
    assert codes.dtype == torch.int8 and codes.shape == t.shape
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert scale.shape == (r, 1)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    rows, crow = t.reshape(r, -1).double(), codes.reshape(r, -1)
    delta = threshold * rows.abs().mean(dim=1, keepdim=True)  # (R, 1)
    margin = 1e-5 * delta  # float32 rounding of delta decides values at the threshold
    below, above = rows.abs() < delta - margin, rows.abs() > delta + margin
    assert bool((crow[below] == 0).all())  # entries below delta are zeroed
    assert torch.equal(crow[above], torch.sign(rows[above]).to(torch.int8))
    kept = crow != 0
    assert bool((rows.abs()[kept] > 0).all())
    n_kept = kept.sum(dim=1)
    none = n_kept == 0
    assert bool((scale[none] == 1.0).all())
    some = ~none
    mean_kept = (rows.abs() * kept).sum(dim=1)[some] / n_kept[some]
    assert torch.allclose(scale[some, 0].double(), mean_kept, rtol=1e-5)
    check_l2_optimal(rows[some].float(), crow[some], scale[some, 0])


def test_ternarize_all_zero_row_is_exact() -> None:
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.1, 0.5]])
    codes, scale = P.ternarize(w)
    assert float(scale[0]) == 1.0 and codes[0].tolist() == [0, 0, 0]
    assert torch.equal(P.dequantize(codes, scale, None)[0], torch.zeros(3))
    # delta = 0.7 * 1.6 / 3 ~= 0.373: -0.1 is dropped, the others kept with scale 0.75
    assert codes[1].tolist() == [1, 0, 1]
    assert float(scale[1]) == pytest.approx(0.75)


def test_binarize_conv_weight_per_channel() -> None:
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    codes, scale = P.binarize(w)
    assert codes.shape == w.shape and scale.shape == (4, 1)
    assert torch.allclose(scale[:, 0], w.abs().reshape(4, -1).mean(dim=1))


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("inf")])
def test_ternarize_refuses_bad_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        P.ternarize(torch.ones(2, 2), threshold=threshold)
