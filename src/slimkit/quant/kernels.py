"""CPU int8 matrix multiplication for per-token dynamic activations x per-channel weights.

``int8_linear(x, state)`` returns ``x @ W^T`` (no bias) where ``x`` (M, K) fp32 is quantized
per row (token) to int8 on the fly and ``W`` (N, K) is held as int8 codes with one scale per
output channel. Three kernels, one contract:

- ``int_mm``: ``torch._int_mm`` (oneDNN); fast where the CPU has VNNI/AMX int8 instructions;
- ``fbgemm``: the fbgemm int8 GEMM behind ``quantized::linear_dynamic``; each row is first
  divided by its max |x|, so the kernel's single activation range is a per-token range.
  Without VNNI the kernel's 16-bit pairwise sums overflow with full 8-bit activations, so it
  runs with 7-bit activation codes (``reduce_range``): real int8 GEMM, slightly less exact;
- ``reference``: the same integer arithmetic on the fp32 kernel (portable, never faster).

``auto`` picks ``int_mm`` on CPUs with VNNI or AMX, else ``fbgemm`` when torch has it, else
``reference``. ``SLIMKIT_INT8_KERNEL`` overrides the choice.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from slimkit.cpu import has_int8_dot

KERNELS = ("auto", "int_mm", "fbgemm", "reference")
_EPS = 1e-12


def int8_kernel(kernel: str = "auto") -> str:
    """The kernel to run: the environment override, else ``kernel``, ``auto`` resolved."""
    kernel = os.environ.get("SLIMKIT_INT8_KERNEL", kernel)
    if kernel not in KERNELS:
        raise ValueError(f"int8 kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel
    if has_int8_dot():
        return "int_mm"
    return "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "reference"


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``x`` (M, K) and the row scales (M, 1)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=_EPS) / 127.0  # (M, 1)
    return torch.round(x / scale).to(torch.int8), scale


@dataclass
class Int8Weight:
    """A weight prepared for one kernel."""

    kernel: str
    codes: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (1, N) fp32
    packed: Any = None  # fbgemm's packed weight


def prepare(codes: torch.Tensor, scale: torch.Tensor, kernel: str = "auto") -> Int8Weight:
    """Prepare int8 ``codes`` (N, K) with per-channel ``scale`` (N, 1) for ``kernel``."""
    name = int8_kernel(kernel)
    row_scale = scale.reshape(1, -1).float()  # (1, N)
    if name != "fbgemm":
        return Int8Weight(name, codes, row_scale)
    with warnings.catch_warnings():  # quantized tensors are only fbgemm's packing format here
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            codes, scale.reshape(-1).double(), torch.zeros(codes.shape[0], dtype=torch.long), 0
        )
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return Int8Weight(name, codes, row_scale, packed)


def int8_linear(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """``x`` (M, K) fp32 times the int8 weight, per-token int8 activations: (M, N) fp32."""
    if w.kernel == "fbgemm":
        row = x.abs().amax(dim=1, keepdim=True).clamp(min=_EPS)  # (M, 1)
        y = torch.ops.quantized.linear_dynamic(x / row, w.packed, True)  # (M, N)
        return y * row
    q, sx = quantize_per_token(x)  # (M, K) int8, (M, 1)
    acc = (
        torch._int_mm(q, w.codes.t())  # (M, N) int32
        if w.kernel == "int_mm"
        else q.float() @ w.codes.float().t()  # (M, N) integer-valued
    )
    return acc.float() * (sx * w.scale)
