"""Affine quantization math: pure functions, tensor in, tensor out.

Conventions: codes are signed integers in ``[qmin, qmax]``; ``x ~= (q - zero_point) * scale``.
Symmetric quantization uses the restricted range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` and a zero
point of 0; asymmetric uses ``[-2^(b-1), 2^(b-1) - 1]`` with an integer zero point chosen so
that 0.0 is exactly representable. Scales are per tensor (shape (1, 1)) or per output channel
(shape (C, 1)), always finite and positive: an all-zero channel gets scale 1 and codes 0.
"""

from __future__ import annotations

import torch


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code for ``bits``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits: got {bits}; allowed: 2..8")
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """View ``w`` as (C, K): one row per output channel, or a single row."""
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def qparams(
    w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (each (C, 1) or (1, 1)) from the min/max of ``w``."""
    qmin, qmax = qrange(bits, symmetric)
    rows = _rows(w.detach().float(), per_channel)  # (C, K)
    lo = rows.min(dim=1, keepdim=True).values.clamp(max=0.0)  # (C, 1), range holds 0
    hi = rows.max(dim=1, keepdim=True).values.clamp(min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = qmin - torch.round(lo / torch.where(scale > 0, scale, 1.0))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero.clamp(qmin, qmax)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Integer codes (int8 tensor of ``w``'s shape) for ``w`` with the given parameters."""
    qmin, qmax = qrange(bits, symmetric)
    rows = w.detach().float().reshape(scale.shape[0], -1)  # (C, K)
    q = torch.clamp(torch.round(rows / scale) + zero, qmin, qmax)
    return q.to(torch.int8).reshape(w.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Float tensor of ``codes``' shape: ``(codes - zero) * scale`` broadcast per row."""
    rows = codes.reshape(scale.shape[0], -1).float()  # (C, K)
    if zero is not None:
        rows = rows - zero
    return (rows * scale).reshape(codes.shape)


def fake_quantize(w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool) -> torch.Tensor:
    """Quantize then dequantize ``w`` (for error measurements)."""
    scale, zero = qparams(w, bits, symmetric, per_channel)
    return dequantize(quantize(w, scale, zero, bits, symmetric), scale, zero).to(w.dtype)
