"""Canonical Huffman coding: lossless, near the entropy, bounded code lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slimkit.encode import huffman as H

SETTINGS = settings(max_examples=40, deadline=None)


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@SETTINGS
@given(
    data=hnp.arrays(np.uint8, st.integers(1, 3000), elements=st.integers(0, 255)),
)
def test_round_trip_is_lossless(data: np.ndarray) -> None:
    symbols = torch.from_numpy(data)
    coded = H.encode(symbols)
    assert torch.equal(H.decode(coded), symbols)


@SETTINGS
@given(
    probs=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=40),
    n=st.integers(500, 5000),
    seed=st.integers(0, 2**16),
)
def test_mean_code_length_is_within_one_bit_of_the_entropy(
    probs: list[float], n: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    p = np.array(probs) / sum(probs)
    data = rng.choice(len(p), size=n, p=p).astype(np.uint8)
    counts = np.bincount(data, minlength=256)
    lengths = H.code_lengths(counts)
    mean = float((lengths * counts).sum() / n)
    h = entropy_bits(counts)
    distinct = int((counts > 0).sum())
    assert mean >= h - 1e-9
    assert mean < h + 1 if distinct > 1 else mean == 1.0
    coded = H.encode(torch.from_numpy(data))
    assert coded.bits.numel() == math.ceil((lengths * counts).sum() / 8)


@SETTINGS
@given(counts=hnp.arrays(np.int64, 256, elements=st.integers(0, 10**6)))
def test_lengths_satisfy_kraft_and_the_cap(counts: np.ndarray) -> None:
    lengths = H.code_lengths(counts)
    present = counts > 0
    assert ((lengths > 0) == present).all()
    assert lengths.max(initial=0) <= H.MAX_LEN
    if present.sum() > 1:
        assert sum(2.0 ** -int(L) for L in lengths[present]) <= 1.0


def test_canonical_codes_are_prefix_free() -> None:
    counts = np.zeros(256, np.int64)
    counts[[0, 1, 2, 7, 200]] = [50, 20, 20, 5, 5]
    lengths = H.code_lengths(counts)
    codes = H.canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths)]
    for a in words:
        for b in words:
            assert a == b or not b.startswith(a)


def test_skewed_counts_are_length_limited_and_still_decode() -> None:
    fib = [1, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])  # Fibonacci weights: unlimited Huffman depth 24
    data = np.repeat(np.arange(25, dtype=np.uint8), fib)
    np.random.default_rng(0).shuffle(data)
    assert H.code_lengths(np.bincount(data, minlength=256)).max() == H.MAX_LEN
    symbols = torch.from_numpy(data)
    assert torch.equal(H.decode(H.encode(symbols)), symbols)


def test_one_distinct_value_and_empty() -> None:
    ones = torch.full((10_001,), 7, dtype=torch.uint8)
    coded = H.encode(ones)
    assert coded.bits.numel() == math.ceil(10_001 / 8)
    assert torch.equal(H.decode(coded), ones)
    empty = H.encode(torch.zeros(0, dtype=torch.uint8))
    assert empty.n == 0 and torch.equal(H.decode(empty), torch.zeros(0, dtype=torch.uint8))


def test_many_chunks_decode_in_parallel() -> None:
    rng = np.random.default_rng(1)
    data = rng.geometric(0.3, size=3 * H.CHUNK + 17).clip(max=255).astype(np.uint8)
    coded = H.encode(torch.from_numpy(data))
    assert coded.starts.numel() == 4
    assert torch.equal(H.decode(coded), torch.from_numpy(data))


def test_bad_input_and_corrupt_streams_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        H.encode(torch.zeros(4, dtype=torch.int64))
    coded = H.encode(torch.full((100,), 3, dtype=torch.uint8))  # the only code is "0"
    flipped = H.Coded(coded.lengths, torch.full_like(coded.bits, 255), coded.starts, coded.n)
    with pytest.raises(ValueError, match="no code"):
        H.decode(flipped)
    data = torch.from_numpy(np.random.default_rng(2).integers(0, 200, 5000).astype(np.uint8))
    coded = H.encode(data)
    cut = H.Coded(coded.lengths, coded.bits[:10], coded.starts, coded.n)
    with pytest.raises(ValueError, match="cannot fit in 80 bits"):
        H.decode(cut)
