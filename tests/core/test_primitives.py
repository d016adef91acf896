"""Affine quantization math: error bounds, code ranges, exact zeros, idempotence."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slimkit.quant import primitives as P

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
weights = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5),
    elements=elements,
)
bits_any = st.integers(min_value=2, max_value=8)


def roundtrip(
    w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, zero = P.qparams(w, bits, symmetric, per_channel)
    codes = P.quantize(w, scale, zero, bits, symmetric)
    dq = P.dequantize(codes, scale, None if symmetric else zero)
    return scale, zero, codes, dq


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, -1)


def check_roundtrip(w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool) -> None:
    scale, zero, codes, dq = roundtrip(w, bits, symmetric, per_channel)
    c = w.shape[0] if per_channel else 1
    qmin, qmax = P.qrange(bits, symmetric)

    assert scale.shape == zero.shape == (c, 1)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    assert dq.shape == w.shape and dq.dtype == torch.float32
    # zero points are integers inside the code range; symmetric has none
    assert torch.equal(zero, torch.round(zero))
    assert float(zero.min()) >= qmin and float(zero.max()) <= qmax
    if symmetric:
        assert not bool(zero.any())

    # every value lies in [min, max] of its row, which the grid covers: error <= scale / 2
    err = rows((dq.double() - w.double()).abs(), c)
    bound = scale.double() * (0.5 + EPS)
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
@given(w=weights, bits=bits_any, symmetric=st.booleans(), per_channel=st.booleans())
def test_roundtrip_any_bits(w: np.ndarray, bits: int, symmetric: bool, per_channel: bool) -> None:
    check_roundtrip(torch.from_numpy(w), bits, symmetric, per_channel)


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
    k=st.integers(1, 8),
    bits=bits_any,
    symmetric=st.booleans(),
    per_channel=st.booleans(),
)
def test_constant_tensor(
    value: float, c: int, k: int, bits: int, symmetric: bool, per_channel: bool
) -> None:
    w = torch.full((c, k), value)
    scale, _, _, dq = roundtrip(w, bits, symmetric, per_channel)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    if value == 0.0:
        assert torch.equal(dq, torch.zeros_like(w))
    else:
        # a constant is the end of its own range: represented up to float rounding
        assert torch.allclose(dq, w, rtol=1e-5, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_zero_gives_scale_one_and_exact_zeros(
    bits: int, symmetric: bool, per_channel: bool
) -> None:
    w = torch.zeros(3, 5)
    scale, _, codes, dq = roundtrip(w, bits, symmetric, per_channel)
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


def test_fake_quantize_matches_roundtrip_and_keeps_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 7, generator=g, dtype=torch.float64)
    fq = P.fake_quantize(w, 8, False, True)
    _, _, _, dq = roundtrip(w, 8, False, True)
    assert fq.dtype == torch.float64
    assert torch.equal(fq, dq.double())
