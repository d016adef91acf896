"""Quantization math: pure functions, tensor in, tensor out.

Affine codes are signed integers in ``[qmin, qmax]`` with ``x ~= (q - zero_point) * scale``.
Symmetric quantization uses the restricted range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` and a zero
point of 0; asymmetric uses ``[-2^(b-1), 2^(b-1) - 1]`` with an integer zero point chosen so
that 0.0 is exactly representable.

Granularity: a weight is viewed as ``(C, K)`` with ``C = w.shape[0]`` and ``K`` the product of
the other dimensions in flattened order (``I * kh * kw`` for a Conv2d weight). Scales and zero
points have shape ``(R, G)``:

* per tensor: ``(1, 1)``;
* per output channel: ``(C, 1)``;
* per group: ``(C, ceil(K / group_size))``, each group a contiguous run of ``group_size``
  along K; when ``group_size`` does not divide K the last group of each row is shorter
  (``K - (ceil(K / group_size) - 1) * group_size`` inputs) and its parameters come from its
  own values only. :func:`quantize` and :func:`dequantize` take ``group_size`` to tell such
  ragged groups apart (without it, each group is ``numel / (R * G)`` consecutive values).

Scales are always finite and positive (float32); a zero-width range gets scale 1, so all-zero
data quantizes to the code of 0.0 and dequantizes to exact zeros.

Binary (``{-1, +1}``) and ternary (``{-1, 0, +1}``) codes come with a per-row scale ``(R, 1)``
and no zero point; :func:`dequantize` handles them with ``zero=None``.
"""

from __future__ import annotations

import torch

_TINY = torch.finfo(torch.float32).tiny


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code for ``bits`` (2..8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits: got {bits}; allowed: 2..8")
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def check_group_size(group_size: int) -> None:
    """Raise ``ValueError`` unless ``group_size`` is a positive integer."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: got {group_size!r}; allowed: a positive integer")


def n_groups(k: int, group_size: int) -> int:
    """Groups in a row of ``k`` inputs: ``ceil(k / group_size)``, the last one shorter when
    ``group_size`` does not divide ``k``."""
    check_group_size(group_size)
    return -(-k // group_size)


def group_view(w: torch.Tensor, per_channel: bool, group_size: int | None) -> torch.Tensor:
    """``w`` as (R, G, g): rows of contiguous groups (see the module docstring).

    A ragged last group is padded by repeating its own last value, so every group's min,
    max and largest magnitude are those of its real values.
    """
    c = w.shape[0] if w.dim() > 0 else 1
    if group_size is not None:
        k = w.numel() // c if c else 0
        n = n_groups(k, group_size)
        rows = w.reshape(c, k)  # (C, K)
        pad = n * group_size - k
        if pad:
            rows = torch.cat([rows, rows[:, -1:].expand(c, pad)], dim=1)  # (C, G * g)
        return rows.reshape(c, n, group_size)  # (C, G, g)
    if per_channel:
        return w.reshape(c, 1, -1)  # (C, 1, K)
    return w.reshape(1, 1, -1)  # (1, 1, C * K)


def per_column(p: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Group parameters ``p`` (R, G) repeated for each of the ``k`` inputs of a row: (R, k)."""
    if p.shape[1] != n_groups(k, group_size):
        raise ValueError(
            f"parameters of shape {tuple(p.shape)} do not fit rows of {k} inputs in groups "
            f"of {group_size}"
        )
    return p.repeat_interleave(group_size, dim=1)[:, :k]  # (R, K)


def _as_2d(p: torch.Tensor) -> torch.Tensor:
    """Parameters as (R, G): 0-d -> (1, 1), (R,) -> (R, 1), (R, G) unchanged."""
    if p.dim() == 2:
        return p
    if p.dim() > 2:
        raise ValueError(f"quantization parameters must have shape (R, G); got {tuple(p.shape)}")
    return p.reshape(-1, 1)


def _split(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """View ``t`` as (R, G, n) to match a (R, G) scale."""
    r, g = scale.shape
    if r * g == 0 or t.numel() % (r * g) != 0:
        raise ValueError(
            f"a scale of shape {tuple(scale.shape)} does not fit a tensor of {t.numel()} values"
        )
    return t.reshape(r, g, -1)  # (R, G, n)


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, ``lo``'s shape) covering ``[lo, hi]`` widened to hold 0.

    Symmetric: ``scale = max(-lo, hi) / qmax`` and ``zero = 0``. Asymmetric:
    ``scale = (hi - lo) / (qmax - qmin)`` and an integer ``zero`` in ``[qmin, qmax]``. A range
    of zero width gets scale 1; scales never go below the smallest normal float32 (a range
    narrower than ~1e-36 is then covered with a coarser step). For ranges reaching beyond
    ~1e38 the end codes may dequantize past float32's maximum.
    """
    if lo.shape != hi.shape:
        raise ValueError(f"lo and hi shapes differ: {tuple(lo.shape)} vs {tuple(hi.shape)}")
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        raise ValueError("non-finite values (NaN or Inf) in the quantization range")
    qmin, qmax = qrange(bits, symmetric)
    # float64 keeps hi - lo from overflowing; the result is rounded once to float32
    lo64 = lo.detach().double().clamp(max=0.0)
    hi64 = hi.detach().double().clamp(min=0.0)
    width = torch.maximum(-lo64, hi64) if symmetric else hi64 - lo64
    scale64 = width / (qmax if symmetric else qmax - qmin)
    # at least the smallest normal float32: a coarser step still covers the range
    scale = torch.where(scale64 > 0, scale64.clamp(min=_TINY), 1.0).float()
    if symmetric:
        return scale, torch.zeros_like(scale)
    zero = qmin - torch.round(lo64.float() / scale)
    return scale, zero.clamp(qmin, qmax)


def qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    per_channel: bool = True,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point, each (R, G), from the min/max of ``w``'s rows or groups.

    ``group_size`` selects per-group parameters (``per_channel`` is then ignored).
    """
    if w.numel() == 0:
        raise ValueError("cannot compute quantization parameters of an empty tensor")
    groups = group_view(w.detach().float(), per_channel, group_size)  # (R, G, g)
    lo = groups.amin(dim=2)  # (R, G)
    hi = groups.amax(dim=2)  # (R, G)
    return params_from_range(lo, hi, bits, symmetric)


def _rows_of(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """View ``t`` as (R, K) to match the rows of a (R, G) scale."""
    r = scale.shape[0]
    if r == 0 or t.numel() % r != 0:
        raise ValueError(
            f"a scale of shape {tuple(scale.shape)} does not fit a tensor of {t.numel()} values"
        )
    return t.reshape(r, -1)  # (R, K)


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
) -> torch.Tensor:
    """Integer codes (int8 tensor of ``w``'s shape): ``clamp(round(w / scale) + zero)``.

    ``scale`` and ``zero`` are (R, G) (or 0-d / (R,), read as (1, 1) / (R, 1)). Without
    ``group_size``, ``w`` is viewed as (R, G, n) so each group of ``n`` consecutive values
    shares one parameter pair; with it, ``w`` is viewed as (R, K) in groups of
    ``group_size`` inputs, the last one of a row shorter when it does not divide K.
    """
    qmin, qmax = qrange(bits, symmetric)
    scale = _as_2d(scale)
    zero = _as_2d(zero)
    if group_size is not None:
        rows = _rows_of(w.detach().float(), scale)  # (R, K)
        k = rows.shape[1]
        s, z = per_column(scale, k, group_size), per_column(zero, k, group_size)  # (R, K)
        q = torch.round(rows / s) + z  # (R, K)
    else:
        parts = _split(w.detach().float(), scale)  # (R, G, n)
        q = torch.round(parts / scale[..., None]) + zero[..., None]  # (R, G, n)
    return torch.clamp(q, qmin, qmax).to(torch.int8).reshape(w.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Float32 tensor of ``codes``' shape: ``(codes - zero) * scale`` broadcast per group
    (``group_size`` as in :func:`quantize`)."""
    scale = _as_2d(scale)
    if group_size is not None:
        rows = _rows_of(codes, scale).float()  # (R, K)
        k = rows.shape[1]
        if zero is not None:
            rows = rows - per_column(_as_2d(zero), k, group_size)
        return (rows * per_column(scale, k, group_size)).reshape(codes.shape)
    parts = _split(codes, scale).float()  # (R, G, n)
    if zero is not None:
        parts = parts - _as_2d(zero)[..., None]
    return (parts * scale[..., None]).reshape(codes.shape)


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    per_channel: bool = True,
    group_size: int | None = None,
) -> torch.Tensor:
    """Quantize then dequantize ``w`` (for error measurements); keeps ``w``'s dtype."""
    scale, zero = qparams(w, bits, symmetric, per_channel, group_size)
    codes = quantize(w, scale, zero, bits, symmetric, group_size)
    return dequantize(codes, scale, zero, group_size).to(w.dtype)


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """View ``w`` as (R, K): one row per output channel, or a single row."""
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    return group_view(w.detach().float(), per_channel, None)[:, 0, :]  # (R, K)


def binarize(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``sign(w)`` in ``{-1, +1}`` (0 -> +1) and the per-row scale ``mean |w|``, (R, 1).

    For fixed signs ``b``, ``mean |w|`` minimizes ``||w - scale * b||^2``. A row of zeros gets
    the smallest normal float32 as its scale (the optimum 0 is not a valid scale).
    """
    rows = _rows(w, per_channel)  # (R, K)
    codes = torch.where(rows >= 0, 1, -1).to(torch.int8)  # (R, K)
    scale = rows.abs().mean(dim=1, keepdim=True).clamp(min=_TINY)  # (R, 1)
    return codes.reshape(w.shape), scale


def ternarize(
    w: torch.Tensor, per_channel: bool = True, threshold: float = 0.7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes in ``{-1, 0, +1}`` and a per-row scale (R, 1).

    Entries with ``|w| > delta``, ``delta = threshold * mean |w|`` of the row, keep their sign;
    the rest become 0. The scale is the mean ``|w|`` of the kept entries (1.0 if none are kept),
    the least-squares optimum for those codes.
    """
    if not (threshold >= 0.0 and threshold < float("inf")):
        raise ValueError(f"threshold: got {threshold}; allowed: a finite value >= 0")
    rows = _rows(w, per_channel)  # (R, K)
    mag = rows.abs()  # (R, K)
    delta = threshold * mag.mean(dim=1, keepdim=True)  # (R, 1)
    keep = mag > delta  # (R, K)
    codes = (torch.sign(rows) * keep).to(torch.int8)  # (R, K)
    n_kept = keep.sum(dim=1, keepdim=True)  # (R, 1)
    kept_sum = (mag * keep).sum(dim=1, keepdim=True)  # (R, 1)
    scale = torch.where(n_kept > 0, kept_sum / n_kept.clamp(min=1), torch.ones_like(kept_sum))
    return codes.reshape(w.shape), scale.clamp(min=_TINY)
