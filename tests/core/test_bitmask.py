"""Bitmask packing: lossless for every length, ceil(n / 8) bytes, documented bit order."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.formats.bitmask import pack_mask, unpack_mask


@settings(max_examples=100, deadline=None, database=None)
@given(bits=st.lists(st.booleans(), min_size=0, max_size=200))
def test_pack_unpack_lossless(bits: list[bool]) -> None:
    mask = torch.tensor(bits, dtype=torch.bool)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (math.ceil(len(bits) / 8),)
    out = unpack_mask(packed, len(bits))
    assert out.dtype == torch.bool
    assert torch.equal(out, mask)


@settings(max_examples=50, deadline=None, database=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_pack_flattens_any_shape(rows: int, cols: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == math.ceil(rows * cols / 8)
    assert torch.equal(unpack_mask(packed, rows * cols).reshape(rows, cols), mask)


def test_empty_mask() -> None:
    packed = pack_mask(torch.zeros(0, dtype=torch.bool))
    assert packed.shape == (0,)
    assert unpack_mask(packed, 0).shape == (0,)


def test_little_endian_bit_order() -> None:
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert pack_mask(mask).tolist() == [1, 2]
    assert pack_mask(torch.ones(8, dtype=torch.bool)).tolist() == [255]


def test_padding_bits_are_zero() -> None:
    packed = pack_mask(torch.ones(3, dtype=torch.bool))
    assert packed.tolist() == [0b111]
