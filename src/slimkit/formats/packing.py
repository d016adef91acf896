"""Lossless bit packing of low-bit integer codes into bytes.

Layout: the values form one little-endian bit stream. Value ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, least significant bit first, and stream bit ``j`` is bit
``j % 8`` of byte ``j // 8``. For 4 bits, byte ``j`` holds value ``2j`` in its low nibble and
value ``2j + 1`` in its high nibble. Unused bits of the last byte are zero. ``n`` values take
exactly ``ceil(n * bits / 8)`` bytes.

1, 2, 4 and 8 bits divide a byte and use direct shift/or paths; 3, 5, 6 and 7 bits go through
a vectorised bit-plane expansion (values -> bits -> bytes). Nothing loops over elements.

Signed codes are mapped to unsigned ones with :func:`to_unsigned` (``codes - qmin``) first.
"""

from __future__ import annotations

import torch

from slimkit.formats.primitives import qrange

_ALLOWED_BITS = range(1, 9)


def _check_bits(bits: int) -> None:
    if bits not in _ALLOWED_BITS:
        raise ValueError(f"bits: got {bits}; allowed: 1..8")


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` values of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel: got {numel}; allowed: >= 0")
    return (numel * bits + 7) // 8


def _offset(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the signed codes; 1 bit means binary codes in {-1, +1}."""
    return (-1, 1) if bits == 1 else qrange(bits, symmetric)


def to_unsigned(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Signed codes in ``[qmin, qmax]`` -> uint8 values ``codes - qmin`` in ``[0, 2^bits)``.

    ``bits=1`` takes binary codes in ``{-1, +1}`` and maps them to ``{0, 1}``.
    """
    _check_bits(bits)
    qmin, qmax = _offset(bits, symmetric)
    wide = codes.to(torch.int16)
    if wide.numel() and (int(wide.min()) < qmin or int(wide.max()) > qmax):
        raise ValueError(f"codes outside [{qmin}, {qmax}] for {bits} bits")
    if bits == 1:
        if bool((wide == 0).any()):
            raise ValueError("binary codes must be -1 or +1")
        return (wide > 0).to(torch.uint8)
    return (wide - qmin).to(torch.uint8)


def from_unsigned(u: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Inverse of :func:`to_unsigned`: uint8 values -> int8 signed codes."""
    _check_bits(bits)
    qmin, _ = _offset(bits, symmetric)
    wide = u.to(torch.int16)
    if bits == 1:
        return (wide * 2 - 1).to(torch.int8)
    return (wide + qmin).to(torch.int8)


def _flat_values(u: torch.Tensor, bits: int) -> torch.Tensor:
    """``u`` flattened to uint8 after checking every value fits in ``bits`` bits."""
    if u.dtype.is_floating_point or u.dtype.is_complex or u.dtype == torch.bool:
        raise ValueError(f"pack needs integer values; got {u.dtype}")
    flat = u.reshape(-1)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= 2**bits:
            raise ValueError(f"values must lie in [0, {2**bits - 1}] for {bits} bits")
    return flat.to(torch.uint8)


def _pad(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """``flat`` zero-padded to a length that is a multiple of ``multiple``."""
    extra = -flat.numel() % multiple
    if extra == 0:
        return flat
    return torch.cat([flat, flat.new_zeros(extra)])


def _pack_divisor(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack for bits in {1, 2, 4}: ``8 // bits`` values per byte, low bits first."""
    per = 8 // bits
    cols = _pad(flat, per).reshape(-1, per)  # (n_bytes, per)
    out = cols[:, 0].clone()  # (n_bytes,)
    for slot in range(1, per):
        out |= cols[:, slot] << (slot * bits)
    return out


def _unpack_divisor(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`_pack_divisor`."""
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (8 // bits,)
    vals = (packed[:, None] >> shifts) & mask  # (n_bytes, 8 // bits)
    return vals.reshape(-1)[:numel]


def _pack_bitplanes(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack any width 1..8: expand values to a bit stream, then fold bytes from it."""
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)  # (bits,)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (n * bits,)
    planes = _pad(stream, 8).reshape(-1, 8)  # (n_bytes, 8)
    out = planes[:, 0].clone()  # (n_bytes,)
    for bit in range(1, 8):
        out |= planes[:, bit] << bit
    return out


def _unpack_bitplanes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bitplanes`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)  # (8,)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)  # (n_bytes * 8,)
    planes = stream[: numel * bits].reshape(numel, bits)  # (n, bits)
    out = planes[:, 0].clone()  # (n,)
    for bit in range(1, bits):
        out |= planes[:, bit] << bit
    return out


def pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned values (< ``2**bits``) into a 1-D uint8 tensor of exact length.

    The result has ``packed_bytes(u.numel(), bits)`` bytes; see the module docstring for the
    bit layout. Raises ``ValueError`` if a value does not fit in ``bits`` bits.
    """
    _check_bits(bits)
    flat = _flat_values(u, bits)  # (n,)
    if bits == 8:
        return flat.clone()
    if flat.numel() == 0:
        return flat.new_zeros(0)
    if 8 % bits == 0:
        return _pack_divisor(flat, bits)
    return _pack_bitplanes(flat, bits)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The ``numel`` uint8 values stored by :func:`pack`, as a 1-D tensor.

    Raises ``ValueError`` unless ``packed`` is a 1-D uint8 tensor of exactly
    ``packed_bytes(numel, bits)`` bytes.
    """
    expected = packed_bytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed data must be a 1-D uint8 tensor; got {packed.dtype}")
    if packed.numel() != expected:
        raise ValueError(
            f"{numel} values of {bits} bits take {expected} bytes; got {packed.numel()}"
        )
    if bits == 8:
        return packed.clone()
    if numel == 0:
        return packed.new_zeros(0)
    if 8 % bits == 0:
        return _unpack_divisor(packed, bits, numel)
    return _unpack_bitplanes(packed, bits, numel)
