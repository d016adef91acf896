"""Packing boolean masks into bytes (8 positions a byte, little-endian bit order)."""

from __future__ import annotations

import torch

_BITS = 2 ** torch.arange(8, dtype=torch.int32)  # (8,)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 tensor of ceil(numel / 8) bytes holding ``mask`` flattened."""
    flat = mask.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)  # (N/8, 8)
    return (flat * _BITS).sum(dim=1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Bool tensor of ``numel`` positions from ``pack_mask``'s bytes."""
    bits = (packed.to(torch.int32).unsqueeze(1) & _BITS) != 0  # (N/8, 8)
    return bits.reshape(-1)[:numel]


def check_mask(packed: torch.Tensor, numel: int, kept: int) -> None:
    """ValueError unless ``packed`` holds ``numel`` positions of which exactly ``kept`` are
    set, with the padding bits of its last byte clear."""
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"mask of {packed.numel()} bytes for {numel} positions")
    bits = (packed.to(torch.int32).unsqueeze(1) & _BITS) != 0  # (N/8, 8)
    flat = bits.reshape(-1)
    if bool(flat[numel:].any()):
        raise ValueError("the mask sets bits past the weight's end")
    count = int(flat[:numel].sum())
    if count != kept:
        raise ValueError(f"the mask keeps {count} weights, but {kept} values are stored")
