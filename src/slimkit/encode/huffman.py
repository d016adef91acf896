"""Canonical Huffman coding of byte streams (Deep Compression's third stage).

:func:`encode` turns a 1-D uint8 tensor of symbols into a :class:`Coded` stream:

- ``lengths`` (uint8, (256,)): the code length of each byte value, 0 for absent values. The
  codes are canonical (assigned in order of (length, value)), so the lengths alone define
  them; no tree is stored.
- ``bits`` (uint8): the concatenated codes, most significant bit first within each byte, the
  last byte zero-padded.
- ``starts`` (int64, (ceil(n / CHUNK),)): the bit offset of every ``CHUNK``-th symbol, so
  decoding runs over all chunks at once (one vectorised step per symbol of a chunk) instead
  of one symbol at a time.
- ``n``: the number of symbols.

Code lengths are limited to ``MAX_LEN`` bits (lengths that would exceed it are rebalanced,
which costs a little compression on extremely skewed inputs), so decoding looks each symbol
up in a ``2**MAX_LEN`` table indexed by the next ``MAX_LEN`` bits. A stream of one distinct
value gets a 1-bit code.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

MAX_LEN = 16
CHUNK = 4096


@dataclass(frozen=True)
class Coded:
    lengths: torch.Tensor  # (256,) uint8
    bits: torch.Tensor  # (ceil(total_bits / 8),) uint8
    starts: torch.Tensor  # (ceil(n / CHUNK),) int64
    n: int

    def nbytes(self) -> int:
        """Bytes of the stored form (lengths, bits and chunk offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.lengths, self.bits, self.starts))


def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code lengths (256,) for symbol ``counts`` (256,), at most ``max_len`` bits."""
    present = np.flatnonzero(counts)
    lengths = np.zeros(256, dtype=np.int64)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present[0]] = 1
        return lengths
    # heap of (weight, tie-breaker, symbols under this node)
    heap: list[tuple[int, int, list[int]]] = [(int(counts[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    tie = 256
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
        tie += 1
    if lengths.max() > max_len:
        lengths = _limit(lengths, counts, max_len)
    return lengths


def _limit(lengths: np.ndarray, counts: np.ndarray, max_len: int) -> np.ndarray:
    """Cap code lengths at ``max_len`` keeping the Kraft sum <= 1: clamp, then lengthen the
    codes of the rarest symbols still below the cap until the sum fits."""
    out = np.minimum(lengths, max_len)
    present = np.flatnonzero(out)
    kraft = int(sum(1 << (max_len - int(out[s])) for s in present))  # in units of 2^-max_len
    budget = 1 << max_len
    by_rarity = sorted(present, key=lambda s: (int(counts[s]), -int(s)))
    while kraft > budget:
        for s in by_rarity:  # rarest first: lengthening its code costs least
            if out[s] < max_len:
                kraft -= 1 << (max_len - int(out[s]) - 1)
                out[s] += 1
                break
    return out


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (as an integer of ``lengths[s]`` bits) of every symbol (256,)."""
    codes = np.zeros(256, dtype=np.int64)
    code, prev_len = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (int(lengths[s]), int(s))):
        code <<= int(lengths[s]) - prev_len
        codes[s] = code
        prev_len = int(lengths[s])
        code += 1
    return codes


def encode(symbols: torch.Tensor) -> Coded:
    """Huffman-code the 1-D uint8 tensor ``symbols``."""
    if symbols.dtype != torch.uint8 or symbols.dim() != 1:
        shape = tuple(symbols.shape)
        raise ValueError(f"symbols must be a 1-D uint8 tensor, got {symbols.dtype} {shape}")
    data = symbols.numpy()
    counts = np.bincount(data, minlength=256)
    lengths = code_lengths(counts)
    codes = canonical_codes(lengths)
    sym_len = lengths[data]  # (n,)
    ends = np.cumsum(sym_len)  # (n,) bit offset after each symbol
    total = int(ends[-1]) if data.size else 0
    starts = np.concatenate([[0], ends[:-1]]) if data.size else np.zeros(0, np.int64)
    # spread every code over its bit positions: bit j of a code of length L sits at
    # starts + j and equals (code >> (L - 1 - j)) & 1
    out = np.zeros(total, dtype=np.uint8)
    sym_code = codes[data]
    for j in range(int(lengths.max()) if data.size else 0):
        has = sym_len > j
        shift = sym_len[has] - 1 - j
        out[starts[has] + j] = (sym_code[has] >> shift) & 1
    packed = np.packbits(out) if total else np.zeros(0, np.uint8)
    return Coded(
        lengths=torch.from_numpy(lengths.astype(np.uint8)),
        bits=torch.from_numpy(packed),
        starts=torch.from_numpy(starts[::CHUNK].astype(np.int64).copy()),
        n=int(data.size),
    )


def decode(coded: Coded) -> torch.Tensor:
    """The symbols of ``coded`` as a 1-D uint8 tensor (the inverse of :func:`encode`)."""
    n = coded.n
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8)
    lengths = coded.lengths.numpy().astype(np.int64)
    if lengths.max() > MAX_LEN or lengths.max() == 0:
        raise ValueError(f"code lengths must be 1..{MAX_LEN} for a non-empty stream")
    table_sym, table_len = _decode_table(lengths)
    bits = np.unpackbits(coded.bits.numpy())
    real_bits = bits.size
    # MAX_LEN zero bits of padding so every window read stays inside the array
    bits = np.concatenate([bits, np.zeros(MAX_LEN, np.uint8)])
    weights = (1 << np.arange(MAX_LEN - 1, -1, -1)).astype(np.int64)  # (MAX_LEN,)
    n_chunks = -(-n // CHUNK)
    pos = coded.starts.numpy().astype(np.int64).copy()  # (n_chunks,)
    _check_starts(pos, n_chunks, n, real_bits)
    first = pos.copy()
    out = np.zeros(n_chunks * CHUNK, dtype=np.uint8)
    window = np.arange(MAX_LEN)
    for i in range(CHUNK):
        live = np.arange(n_chunks) * CHUNK + i < n  # chunks that still have symbol i
        if not live.any():
            break
        idx = np.flatnonzero(live)
        if (pos[idx] >= real_bits).any():
            raise ValueError("the coded stream is truncated")
        key = bits[pos[idx, None] + window] @ weights  # (live,)
        if (table_len[key] > MAX_LEN).any():
            raise ValueError("the coded stream holds a bit pattern that is no code")
        out[idx * CHUNK + i] = table_sym[key]
        pos[idx] += table_len[key]
    _check_ends(first, pos, real_bits)
    return torch.from_numpy(out[:n])


def _check_starts(starts: np.ndarray, n_chunks: int, n: int, real_bits: int) -> None:
    """ValueError unless the chunk offsets can be those of a stream of ``n`` symbols in
    ``real_bits`` bits: one per chunk, the first 0, increasing by 1..MAX_LEN bits per symbol."""
    if starts.shape[0] != n_chunks:
        raise ValueError(f"expected {n_chunks} chunk offsets, got {starts.shape[0]}")
    if n > real_bits:
        raise ValueError(f"{n} symbols cannot fit in {real_bits} bits")
    if starts[0] != 0:
        raise ValueError(f"the first chunk starts at bit {int(starts[0])}, not 0")
    steps = np.diff(starts)
    if (steps < CHUNK).any() or (steps > CHUNK * MAX_LEN).any():
        raise ValueError("the chunk offsets are not those of consecutive chunks")


def _check_ends(starts: np.ndarray, ends: np.ndarray, real_bits: int) -> None:
    """ValueError unless every chunk ends where the next starts, and the last within the
    final byte of the stream (only zero padding after it)."""
    if (ends[:-1] != starts[1:]).any():
        raise ValueError("a chunk does not end where the next one starts")
    if not real_bits - 8 < ends[-1] <= real_bits:
        raise ValueError(f"the stream ends at bit {int(ends[-1])} of {real_bits}")


def _decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symbol and code length for every ``MAX_LEN``-bit window (2**MAX_LEN,)."""
    codes = canonical_codes(lengths)
    table_sym = np.zeros(1 << MAX_LEN, dtype=np.uint8)
    table_len = np.full(1 << MAX_LEN, MAX_LEN + 1, dtype=np.int64)  # invalid prefix marker
    for s in np.flatnonzero(lengths):
        width = MAX_LEN - int(lengths[s])
        first = int(codes[s]) << width
        table_sym[first : first + (1 << width)] = s
        table_len[first : first + (1 << width)] = lengths[s]
    return table_sym, table_len
