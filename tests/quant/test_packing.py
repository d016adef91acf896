"""Bit packing: lossless round trips, exact byte counts, layout, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimkit.formats import packing as K
from slimkit.formats.primitives import qrange

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def values(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """Unsigned values below ``2**bits`` of a random length (often not a multiple of 8)."""
    bits = draw(st.integers(1, 8))
    n = draw(st.integers(0, 200))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 2**bits, size=n, dtype=np.uint8)
    return torch.from_numpy(u), bits


def reference_pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout, built with a Python integer: value i at bits [i*b, (i+1)*b)."""
    stream = 0
    for i, v in enumerate(u.tolist()):
        stream |= v << (i * bits)
    n_bytes = (u.numel() * bits + 7) // 8
    return torch.tensor(list(stream.to_bytes(n_bytes, "little")), dtype=torch.uint8)


@SETTINGS
@given(data=values())
def test_pack_roundtrip_and_byte_count(data: tuple[torch.Tensor, int]) -> None:
    u, bits = data
    packed = K.pack(u, bits)
    expected = -(-u.numel() * bits // 8)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == expected == K.packed_bytes(u.numel(), bits)
    assert torch.equal(packed, reference_pack(u, bits))
    out = K.unpack(packed, bits, u.numel())
    assert out.dtype == torch.uint8 and out.shape == (u.numel(),)
    assert torch.equal(out, u)


@SETTINGS
@given(data=values())
def test_fast_paths_match_the_bitplane_path(data: tuple[torch.Tensor, int]) -> None:
    u, bits = data
    if u.numel() == 0:
        return
    generic = K._pack_bitplanes(u, bits)
    assert torch.equal(K.pack(u, bits), generic)
    assert torch.equal(K._unpack_bitplanes(generic, bits, u.numel()), u)


def test_pack_keeps_shape_independent_of_layout() -> None:
    u = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4) % 8
    assert torch.equal(K.unpack(K.pack(u, 3), 3, 24).reshape(2, 3, 4), u)


def test_four_bit_layout_is_low_nibble_first() -> None:
    u = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    assert K.pack(u, 4).tolist() == [0x21, 0x0F, 0x07]


def test_three_bit_layout() -> None:
    # stream (LSB first): 101 011 111 -> bits 0..8 = 1,0,1,0,1,1,1,1,1
    u = torch.tensor([5, 6, 7], dtype=torch.uint8)
    assert K.pack(u, 3).tolist() == [0b11110101, 0b1]


@pytest.mark.parametrize("bits", range(1, 9))
def test_value_too_large_is_refused(bits: int) -> None:
    if bits == 8:
        u = torch.tensor([0, 256], dtype=torch.int16)
    else:
        u = torch.tensor([0, 2**bits], dtype=torch.uint8)
    with pytest.raises(ValueError, match="values must lie in"):
        K.pack(u, bits)


def test_negative_and_float_values_are_refused() -> None:
    with pytest.raises(ValueError, match="values must lie in"):
        K.pack(torch.tensor([-1, 0], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="integer"):
        K.pack(torch.tensor([1.0]), 4)


def test_wider_integer_dtypes_are_accepted() -> None:
    u = torch.tensor([3, 0, 2, 1], dtype=torch.int64)
    assert torch.equal(K.unpack(K.pack(u, 2), 2, 4), u.to(torch.uint8))


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        K.pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        K.packed_bytes(4, bits)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_wrong_byte_count_is_refused(bits: int) -> None:
    packed = K.pack(torch.ones(10, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bytes"):
        K.unpack(torch.cat([packed, packed[:1]]), bits, 10)
    with pytest.raises(ValueError, match="bytes"):
        K.unpack(packed[:-1], bits, 10)


def test_unpack_needs_1d_uint8() -> None:
    with pytest.raises(ValueError, match="1-D uint8"):
        K.unpack(torch.zeros(2, 2, dtype=torch.uint8), 8, 4)
    with pytest.raises(ValueError, match="1-D uint8"):
        K.unpack(torch.zeros(4, dtype=torch.int8), 8, 4)


def test_packed_bytes() -> None:
    assert K.packed_bytes(0, 3) == 0
    assert K.packed_bytes(1, 1) == 1
    assert K.packed_bytes(8, 3) == 3
    assert K.packed_bytes(9, 3) == 4
    assert K.packed_bytes(12_000_000, 4) == 6_000_000


# --- signed <-> unsigned -------------------------------------------------------------------


@SETTINGS
@given(bits=st.integers(2, 8), symmetric=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_to_unsigned_roundtrip(bits: int, symmetric: bool, seed: int) -> None:
    qmin, qmax = qrange(bits, symmetric)
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(qmin, qmax + 1, size=37).astype(np.int8))
    u = K.to_unsigned(codes, bits, symmetric)
    assert u.dtype == torch.uint8
    assert torch.equal(u.to(torch.int16), codes.to(torch.int16) - qmin)
    assert int(u.max()) < 2**bits
    back = K.from_unsigned(u, bits, symmetric)
    assert back.dtype == torch.int8 and torch.equal(back, codes)
    assert torch.equal(K.from_unsigned(K.unpack(K.pack(u, bits), bits, 37), bits, symmetric), codes)


def test_binary_and_ternary_codes() -> None:
    binary = torch.tensor([-1, 1, 1, -1, 1], dtype=torch.int8)
    u = K.to_unsigned(binary, 1, True)
    assert u.tolist() == [0, 1, 1, 0, 1]
    assert torch.equal(K.from_unsigned(u, 1, True), binary)
    ternary = torch.tensor([-1, 0, 1, 0], dtype=torch.int8)
    u = K.to_unsigned(ternary, 2, True)
    assert u.tolist() == [0, 1, 2, 1]
    assert torch.equal(K.from_unsigned(u, 2, True), ternary)


def test_to_unsigned_refuses_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="outside"):
        K.to_unsigned(torch.tensor([-8], dtype=torch.int8), 4, True)
    with pytest.raises(ValueError, match="binary"):
        K.to_unsigned(torch.tensor([0], dtype=torch.int8), 1, True)


# --- speed ---------------------------------------------------------------------------------


def best_unpack_time(bits: int, n: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of unpacking ``n`` codes from random bytes."""
    n_bytes = K.packed_bytes(n, bits)
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=gen)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = K.unpack(packed, bits, n)
        best = min(best, time.perf_counter() - start)
    assert out.shape == (n,) and int(out.max()) < 2**bits
    assert torch.equal(out[:64], reference_unpack(packed[: 8 * bits], bits, 64))
    return best


def reference_unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    stream = int.from_bytes(bytes(packed.tolist()), "little")
    mask = (1 << bits) - 1
    return torch.tensor([(stream >> (i * bits)) & mask for i in range(n)], dtype=torch.uint8)


def test_unpack_12m_four_bit_codes_is_fast() -> None:
    assert best_unpack_time(4, 12_000_000) < 0.5


def test_unpack_three_bit_codes_is_fast() -> None:
    # the rate of 12M codes in under 1 s, timed on a third of them to keep the test short
    assert best_unpack_time(3, 4_000_000) < 1.0 / 3
