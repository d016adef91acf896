"""Kept positions of a sparse weight as gaps: one uint8 symbol per run of pruned weights.

Deep Compression stores the positions of the kept weights as the distance from the previous
one, which Huffman then codes. Here, with an escape symbol ``E`` (1..255), a symbol ``s < E``
means "skip ``s`` pruned weights, then a kept one"; the symbol ``E`` means "skip ``E`` pruned
weights" (no kept weight), so any gap fits. Pruned weights after the last kept one are implied
by the weight count. A small ``E`` keeps the alphabet, and so the code-length table stored
with the code, small (it matters for small layers); a large one needs fewer escapes.

At density ``p`` the gaps are about geometric, and their Huffman code costs close to the
entropy of the positions, ``H(p) / p`` bits per kept weight; coding the bitmask byte by byte
costs more at high sparsity (a mostly-zero byte still takes a whole code word).
"""

from __future__ import annotations

import torch

from slimkit.formats.bitmask import pack_mask, unpack_mask

ESCAPE = 255  # the default escape: "skip 255 pruned weights"
ESCAPES = (3, 7, 15, 31, 63, 127, 255)  # the escapes the encode stage tries


def _check(escape: int) -> None:
    if not 1 <= escape <= 255:
        raise ValueError(f"escape {escape}; allowed: 1..255")


def gaps_from_mask(mask: torch.Tensor, numel: int, escape: int = ESCAPE) -> torch.Tensor:
    """The uint8 gap symbols of the packed bitmask ``mask`` of ``numel`` positions."""
    _check(escape)
    kept = torch.nonzero(unpack_mask(mask, numel)).reshape(-1)  # (nnz,) ascending
    previous = torch.cat([kept.new_full((1,), -1), kept[:-1]])
    gaps = kept - previous - 1  # pruned weights before each kept one
    escapes = torch.div(gaps, escape, rounding_mode="floor")
    # each kept weight: `escapes` escape symbols, then its remainder
    counts = escapes + 1
    symbols = torch.full((int(counts.sum()),), escape, dtype=torch.int64)
    ends = torch.cumsum(counts, 0) - 1
    symbols[ends] = gaps - escapes * escape
    return symbols.to(torch.uint8)


def mask_from_gaps(symbols: torch.Tensor, numel: int, escape: int = ESCAPE) -> torch.Tensor:
    """The packed bitmask of ``numel`` positions that ``symbols`` describe; ValueError when they
    point past the end or use a symbol above ``escape``."""
    _check(escape)
    s = symbols.to(torch.int64)
    if s.numel() and int(s.max()) > escape:
        raise ValueError(f"gap symbol {int(s.max())} is above the escape {escape}")
    step = torch.where(s == escape, escape, s + 1)  # positions each symbol advances
    kept = (torch.cumsum(step, 0) - 1)[s != escape]
    if kept.numel() and int(kept[-1]) >= numel:
        raise ValueError(f"gap symbols point at position {int(kept[-1])} of {numel}")
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[kept] = True
    return pack_mask(keep)
