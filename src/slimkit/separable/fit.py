r"""Least-squares fit of a depthwise + pointwise convolution pair to a dense 2-D kernel.

A standard convolution has the kernel :math:`W \in \mathbb{R}^{C_o \times C_i \times k_h
\times k_w}`. A depthwise convolution with depth multiplier :math:`m` (filters
:math:`D \in \mathbb{R}^{C_i m \times k_h \times k_w}`, filter :math:`cm + j` reading input
channel :math:`c` only) followed by a 1x1 pointwise convolution (:math:`P \in
\mathbb{R}^{C_o \times C_i m}`) computes, by linearity of convolution, the same as one
convolution with the kernel

.. math:: W'[o, c] = \sum_{j<m} P[o, cm + j] \, D[cm + j] .

Flatten each spatial filter to a row of length :math:`K = k_h k_w` and write
:math:`A_c = W[:, c] \in \mathbb{R}^{C_o \times K}` for input channel :math:`c`. Then

.. math:: W'[:, c] = P_c D_c, \quad P_c = P[:, cm : cm + m] \in \mathbb{R}^{C_o \times m},
          \quad D_c = D[cm : cm + m] \in \mathbb{R}^{m \times K},

a matrix of rank at most :math:`m`, and the factors of different input channels are
disjoint. The squared Frobenius error therefore splits into independent terms,

.. math:: \|W - W'\|_F^2 = \sum_c \|A_c - P_c D_c\|_F^2 ,

each minimised on its own over all products :math:`P_c D_c` of rank :math:`\le m`. By the
Eckart-Young-Mirsky theorem the minimiser is the truncated SVD: with :math:`A_c = U \Sigma
V^\top` (singular values :math:`s_1 \ge s_2 \ge \dots \ge s_r`, :math:`r = \min(C_o, K)`),
:math:`P_c D_c = \sum_{j < \min(m, r)} s_j u_j v_j^\top` and the least error is
:math:`\sum_{j \ge m} s_j^2`. So the fit is exact (up to rounding) when
:math:`m \ge \min(C_o, K)`, and the relative error of the whole layer is

.. math:: \frac{\|W - W'\|_F}{\|W\|_F}
          = \sqrt{\frac{\sum_c \sum_{j \ge m} s_{c,j}^2}{\sum_c \sum_j s_{c,j}^2}} .

Any split of :math:`s_j` between the factors gives the same product; :func:`separable_fit`
puts :math:`\sqrt{s_j}` into each, so both factors have the same scale (better conditioned
for later fine-tuning). Filters beyond the rank (:math:`m > r`) get the remaining right
singular vectors (or zeros once those run out) with zero pointwise weights: they add nothing
to the product but leave fine-tuning a direction to grow.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SeparableFit:
    """The factors of a fitted kernel and how far their product is from it."""

    depthwise: torch.Tensor  # (Cin * m, 1, kh, kw): the depthwise convolution's weight
    pointwise: torch.Tensor  # (Cout, Cin * m, 1, 1): the pointwise convolution's weight
    error: float  # ||W - W'||_F / ||W||_F (0 for an all-zero W)


def separable_fit(weight: torch.Tensor, multiplier: int = 1) -> SeparableFit:
    """The least-squares depthwise (multiplier ``multiplier``) + pointwise factors of the
    dense kernel ``weight`` (Cout, Cin, kh, kw): a truncated SVD per input channel (see the
    module doc). Computed in float64; the factors come back in ``weight``'s dtype."""
    if weight.dim() != 4:
        raise ValueError(f"expected a (Cout, Cin, kh, kw) kernel, got shape {tuple(weight.shape)}")
    if multiplier < 1:
        raise ValueError(f"multiplier must be >= 1, got {multiplier}")
    cout, cin, kh, kw = weight.shape
    k, m = kh * kw, multiplier
    w = weight.detach().to(torch.float64)
    a = w.permute(1, 0, 2, 3).reshape(cin, cout, k)  # (Cin, Cout, K): A_c per input channel
    u, s, vh = torch.linalg.svd(a, full_matrices=True)  # (Cin, Cout, Cout), (Cin, r), (Cin, K, K)
    r = s.shape[1]
    kept = min(m, r)
    root = s[:, :kept].sqrt()  # (Cin, kept)
    d = torch.zeros(cin, m, k, dtype=torch.float64)  # D_c: (m, K) per input channel
    p = torch.zeros(cin, cout, m, dtype=torch.float64)  # P_c: (Cout, m) per input channel
    d[:, :kept] = root.unsqueeze(2) * vh[:, :kept]  # sqrt(s_j) v_j
    p[:, :, :kept] = u[:, :, :kept] * root.unsqueeze(1)  # sqrt(s_j) u_j
    spare = min(m, k)
    if spare > kept:  # filters beyond the rank: unused right singular vectors, no pointwise
        scale = root.mean(dim=1, keepdim=True).unsqueeze(2) if kept else 1.0
        d[:, kept:spare] = scale * vh[:, kept:spare]
    depthwise = d.reshape(cin * m, 1, kh, kw)
    pointwise = p.permute(1, 0, 2).reshape(cout, cin * m, 1, 1)
    approx = compose(depthwise, pointwise, cin)
    return SeparableFit(
        depthwise.to(weight.dtype),
        pointwise.to(weight.dtype),
        relative_error(w, approx),
    )


def compose(depthwise: torch.Tensor, pointwise: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The dense kernel (Cout, Cin, kh, kw) that depthwise (Cin * m, 1, kh, kw) followed by
    pointwise (Cout, Cin * m, 1, 1) computes: ``W'[o, c] = sum_j P[o, cm+j] D[cm+j]``."""
    cm, _, kh, kw = depthwise.shape
    cout = pointwise.shape[0]
    if pointwise.shape[1] != cm or cm % in_channels:
        raise ValueError(
            f"depthwise gives {cm} channels, pointwise takes {pointwise.shape[1]}, "
            f"for {in_channels} input channels"
        )
    m = cm // in_channels
    p = pointwise.reshape(cout, in_channels, m)  # (Cout, Cin, m)
    d = depthwise.reshape(in_channels, m, kh * kw)  # (Cin, m, K)
    return torch.einsum("ocj,cjk->ock", p, d).reshape(cout, in_channels, kh, kw)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||weight - approx||_F / ||weight||_F``; 0 when both are zero, inf when only
    ``weight`` is."""
    norm = float(torch.linalg.vector_norm(weight.double()))
    diff = float(torch.linalg.vector_norm(weight.double() - approx.double()))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def separable_params(cin: int, cout: int, kh: int, kw: int, multiplier: int) -> int:
    """Weights of the depthwise + pointwise pair (bias not counted)."""
    return cin * multiplier * kh * kw + cout * cin * multiplier
