"""Pure math of the factorize stage: truncated SVD, Tucker-2, spatial SVD and rank rules.

Every function takes and returns plain tensors; decompositions run in float64 and return
float64 factors (the caller casts them to the layer's dtype).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch


# -- rank rules ----------------------------------------------------------------------------
def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest r whose leading squared singular values ``s[:r]**2`` sum to at least
    ``energy`` (in (0, 1]) of the total; at least 1."""
    sq = s.double().reshape(-1) ** 2
    if sq.numel() == 0:
        return 0
    cum = torch.cumsum(sq, 0)
    total = float(cum[-1])
    if total <= 0.0:
        return 1
    r = int(torch.searchsorted(cum, torch.tensor([energy * total], dtype=cum.dtype))[0]) + 1
    return min(max(r, 1), sq.numel())


def ratio_rank(out_features: int, in_features: int, ratio: float) -> int:
    """The largest r with r * (out + in) <= ratio * out * in (may be 0)."""
    return math.floor(ratio * out_features * in_features / (out_features + in_features))


def shrinks(rank: int, in_features: int, out_features: int) -> bool:
    """Whether rank-``rank`` factors (in -> r -> out) hold fewer weights than the dense one."""
    return rank * (in_features + out_features) < in_features * out_features


def max_shrinking_rank(in_features: int, out_features: int) -> int:
    """The largest r with r * (in + out) < in * out (0 when none)."""
    return max((in_features * out_features - 1) // (in_features + out_features), 0)


# -- SVD of a matrix -----------------------------------------------------------------------
def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a 2-D ``w`` in float64: (U (m, k), S (k,), Vh (k, n)), k = min(m, n)."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return u, s, vh


def split_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (m, r), A (r, n)) with B @ A the rank-r truncation; sqrt(S) goes into both."""
    root = s[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncate(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B (out, r), A (r, in)) of the best rank-r approximation of ``w`` (out, in)
    in the Frobenius norm (Eckart–Young): ||w - B A||² = sum of the discarded σ²."""
    u, s, vh = svd(w)
    return split_factors(u, s, vh, rank)


# -- Tucker-2 on the channel modes of a conv weight ----------------------------------------
def mode_unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding of a 4-D tensor: (w.shape[mode], everything else)."""
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def mode_singular_values(w: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.linalg.svdvals(mode_unfold(w.detach().double(), mode))


def _leading(m: torch.Tensor, rank: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank]


def tucker2(
    w: torch.Tensor, rank_out: int, rank_in: int, iters: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv weight ``w`` (Cout, Cin, kh, kw) on its two channel modes.

    Returns (U_out (Cout, r_out), core (r_out, r_in, kh, kw), U_in (Cin, r_in)) with
    ``w ≈ core ×0 U_out ×1 U_in``: HOSVD (leading left singular vectors of each mode's
    unfolding), then ``iters`` HOOI sweeps (each factor refit to the weight projected on
    the other), which never increase the error. ValueError when a rank exceeds its mode's
    unfolding (:func:`tucker_max_ranks`).
    """
    c_out, c_in, kh, kw = w.shape
    k = kh * kw
    max_in, max_out = tucker_max_ranks(c_out, c_in, k)
    for name, rank, most in (("rank_out", rank_out, max_out), ("rank_in", rank_in, max_in)):
        if not 1 <= rank <= most:
            raise ValueError(
                f"tucker2: {name} {rank} exceeds {most}, the rank of the weight's "
                f"{tuple(w.shape)} unfolding on that mode"
            )
    if (rank_in, rank_out) != tucker_core_ranks(rank_in, rank_out, k):
        raise ValueError(
            f"tucker2: ranks (in {rank_in}, out {rank_out}) do not fit a core with a "
            f"{k}-element kernel: each rank must be at most the other times {k}"
        )
    w = w.detach().double()
    u_out = _leading(mode_unfold(w, 0), rank_out)
    u_in = _leading(mode_unfold(w, 1), rank_in)
    for _ in range(iters):
        u_out = _leading(mode_unfold(torch.einsum("oihw,is->oshw", w, u_in), 0), rank_out)
        u_in = _leading(mode_unfold(torch.einsum("oihw,or->rihw", w, u_out), 1), rank_in)
    core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)
    return u_out, core, u_in


def tucker2_weight(u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """The conv weight (Cout, Cin, kh, kw) a Tucker-2 decomposition represents."""
    return torch.einsum("rshw,or,is->oihw", core, u_out, u_in)


def tucker_params(c_in: int, c_out: int, kernel: int, rank_in: int, rank_out: int) -> int:
    """Weights of the three convs: Cin r_in + r_in r_out k + r_out Cout (k = kh kw)."""
    return c_in * rank_in + rank_in * rank_out * kernel + rank_out * c_out


def tucker_max_ranks(c_out: int, c_in: int, kernel: int) -> tuple[int, int]:
    """(most r_in, most r_out): the ranks of the input and output modes' unfoldings,
    min(Cin, Cout k) and min(Cout, Cin k); a larger rank adds nothing."""
    return min(c_in, c_out * kernel), min(c_out, c_in * kernel)


def tucker_core_ranks(rank_in: int, rank_out: int, kernel: int) -> tuple[int, int]:
    """(r_in, r_out) lowered until the core (r_out, r_in, k) can have them: r_out <= r_in k
    and r_in <= r_out k (the ranks of its own unfoldings; for a 1x1 conv r_in = r_out)."""
    return min(rank_in, rank_out * kernel), min(rank_out, rank_in * kernel)


def tucker_ratio_ranks(c_in: int, c_out: int, kernel: int, ratio: float) -> tuple[int, int] | None:
    """(r_in, r_out) with r_in / Cin ≈ r_out / Cout, each at most its mode's unfolding rank
    (:func:`tucker_max_ranks`), holding the most weights within ``ratio`` of the dense
    Cin Cout k; None when even (1, 1) exceeds it."""
    budget = ratio * c_in * c_out * kernel
    max_in, max_out = tucker_max_ranks(c_out, c_in, kernel)
    pairs = {(r, min(max(round(r * c_out / c_in), 1), max_out)) for r in range(1, max_in + 1)}
    pairs |= {(min(max(round(r * c_in / c_out), 1), max_in), r) for r in range(1, max_out + 1)}
    pairs = {tucker_core_ranks(*p, kernel) for p in pairs}
    fitting = [p for p in pairs if tucker_params(c_in, c_out, kernel, *p) <= budget]
    if not fitting:
        return None
    return max(fitting, key=lambda p: (tucker_params(c_in, c_out, kernel, *p), p))


# -- spatial SVD (Jaderberg et al. 2014, scheme 2) -------------------------------------------
def spatial_matrix(w: torch.Tensor) -> torch.Tensor:
    """Conv weight (Cout, Cin, kh, kw) as M[(c, y), (o, x)] = w[o, c, y, x]: (Cin kh, Cout kw)."""
    c_out, c_in, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def spatial_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A kxk conv weight (Cout, Cin, kh, kw) as a vertical (r, Cin, kh, 1) followed by a
    horizontal (Cout, r, 1, kw) conv weight, from the rank-r truncation of
    :func:`spatial_matrix` (exact at full rank)."""
    c_out, c_in, kh, kw = w.shape
    b, a = truncate(spatial_matrix(w), rank)  # (Cin kh, r), (r, Cout kw)
    vertical = b.reshape(c_in, kh, rank).permute(2, 0, 1).unsqueeze(-1)  # (r, Cin, kh, 1)
    horizontal = a.reshape(rank, c_out, kw).permute(1, 0, 2).unsqueeze(2)  # (Cout, r, 1, kw)
    return vertical, horizontal


def spatial_weight(vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """The conv weight (Cout, Cin, kh, kw) a vertical + horizontal pair represents."""
    return torch.einsum("rcy,orx->ocyx", vertical[..., 0], horizontal[:, :, 0])


# -- sensitivity allocation ------------------------------------------------------------------
def output_gains(s: torch.Tensor, vh: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Per singular component i, the squared output error on inputs with second moment
    ``cov`` = X^T X (in, in) that keeping it removes: σ_i² v_i^T C v_i (the components'
    errors add up because the left singular vectors are orthonormal)."""
    v = vh.double()
    return s.double() ** 2 * torch.einsum("ij,jk,ik->i", v, cov.double(), v)


def allocate_ranks(
    gains: Sequence[torch.Tensor], costs: Sequence[int], caps: Sequence[int], budget: float
) -> list[int]:
    """Ranks within a total weight ``budget``: every layer starts at rank 1 (cost
    ``costs[l]`` per rank), then one rank at a time goes to the layer whose next
    component removes the most output error per weight (``gains[l][r]`` / cost), until no
    next rank fits the budget or every layer reaches its cap. A layer whose rank 1 does
    not fit gets rank 0 (left dense by the caller)."""
    ranks = [0] * len(costs)
    spent = 0.0
    for i in sorted(range(len(costs)), key=lambda i: costs[i]):
        if caps[i] >= 1 and spent + costs[i] <= budget:
            ranks[i], spent = 1, spent + costs[i]
    heap = [
        (-float(gains[i][1]) / costs[i], i) for i in range(len(costs)) if 1 <= ranks[i] < caps[i]
    ]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            continue
        ranks[i] += 1
        spent += costs[i]
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-float(gains[i][ranks[i]]) / costs[i], i))
    return ranks
