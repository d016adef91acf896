"""Codebook weights (Deep Compression's weight sharing): ``2**bits`` shared float values per
layer and, for every weight, the index of its value.

Stored tensors: ``codebook`` (fp32, (2**bits,)) and ``indices`` (uint8, packed to ``bits``
bits each, :mod:`slimkit.formats.packing`). ``SparseCodebookFormat`` composes it with a
sparse mask: the indices are those of the kept weights only (in mask order), ``mask`` holds
one bit per weight, and pruned weights are exactly zero.

Encoding clusters the weights in one dimension with Lloyd's algorithm (``kmeans_1d``).
Decoding is a gather (far faster than advanced indexing on CPU); its backward scatter-adds
each weight's gradient into its shared value, so a codebook can be fine-tuned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from slimkit.compressed import StreamKind
from slimkit.formats import packing
from slimkit.formats.base import Slot, Stream, Tensors, WeightFormat
from slimkit.formats.bitmask import check_mask, pack_mask, unpack_mask

MIN_BITS, MAX_BITS = 1, 8
INITS = ("linear", "density")


# -- clustering (pure functions) -------------------------------------------------------------
def codebook_size(bits: int) -> int:
    """Shared values per layer for ``bits``-bit indices: ``2**bits``."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits: got {bits}; allowed: {MIN_BITS}..{MAX_BITS}")
    return 2**bits


def storage_bytes(numel: int, bits: int) -> int:
    """Bytes a layer of ``numel`` weights stores: the fp32 codebook + the packed indices."""
    return 4 * codebook_size(bits) + packing.packed_bytes(numel, bits)


def initial_centroids(sorted_values: torch.Tensor, k: int, init: str) -> torch.Tensor:
    """(k,) ascending starting centroids for ascending 1-D values (N,).

    ``linear``: evenly spaced over [min, max], so the rare large weights get centroids of their
    own; ``density``: the values at evenly spaced quantiles.
    """
    sv = sorted_values
    if init == "linear":
        return torch.linspace(float(sv[0]), float(sv[-1]), k, dtype=sv.dtype, device=sv.device)
    n = sv.numel()
    pos = ((torch.arange(k, dtype=torch.float64, device=sv.device) + 0.5) * (n / k)).long()
    pos = pos.clamp_(max=n - 1)  # (k,)
    return sv[pos].clone()  # (k,)


def _cuts(sorted_values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(k + 1,) cluster bounds in the sorted values: cluster ``j`` is
    ``sorted_values[cuts[j]:cuts[j + 1]]``, the values nearest to centroid ``j``.

    The centroids must be ascending: the cells are then split at the centroids' midpoints.
    """
    mids = (centroids[1:] + centroids[:-1]) / 2  # (k - 1,)
    inner = torch.searchsorted(sorted_values, mids)  # (k - 1,)
    ends = torch.tensor([0, sorted_values.numel()], dtype=inner.dtype, device=inner.device)
    return torch.cat([ends[:1], inner, ends[1:]])  # (k + 1,)


def _cluster_means(
    sorted_values: torch.Tensor, prefix: torch.Tensor, cuts: torch.Tensor, old: torch.Tensor
) -> torch.Tensor:
    """(k,) mean of each cluster from the prefix sums (N + 1,); an empty cluster keeps its
    old centroid. Each mean is clamped into its cluster's value range, so a cluster of equal
    values gets exactly that value despite the rounding of the prefix sums."""
    lo, hi = cuts[:-1], cuts[1:]  # (k,), (k,)
    counts = hi - lo  # (k,)
    means = (prefix[hi] - prefix[lo]) / counts.clamp(min=1)  # (k,)
    last = sorted_values.numel() - 1
    first_value = sorted_values[lo.clamp(max=last)]  # (k,)
    last_value = sorted_values[(hi - 1).clamp(min=0)]  # (k,)
    means = torch.minimum(torch.maximum(means, first_value), last_value)
    return torch.where(counts > 0, means, old)


def _reseed_empty(
    sorted_values: torch.Tensor, cuts: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    """(k,) ``centroids`` with each empty cluster's centroid moved onto one of the values
    worst represented by the clustering ``cuts`` (largest squared error, ties by position),
    so no codebook entry stays unused while some value is not exact. This only lowers the
    within-cluster sum of squares: a re-seeded value's error drops to zero."""
    counts = cuts.diff()  # (k,)
    empty = (counts == 0).nonzero().squeeze(1)  # (E,)
    labels = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    err = (sorted_values - centroids[labels]) ** 2  # (N,)
    worst = torch.argsort(err, descending=True, stable=True)[: empty.numel()]  # (<= E,)
    worst = worst[err[worst] > 0]
    out = centroids.clone()
    out[empty[: worst.numel()]] = sorted_values[worst]
    return out


def _lloyd_step(
    sorted_values: torch.Tensor, prefix: torch.Tensor, cuts: torch.Tensor, old: torch.Tensor
) -> torch.Tensor:
    """(k,) ascending centroids after one update of the clustering ``cuts``: the means,
    empty clusters re-seeded."""
    centroids = _cluster_means(sorted_values, prefix, cuts, old)
    if bool((cuts.diff() == 0).any()):
        centroids = _reseed_empty(sorted_values, cuts, centroids)
    return centroids.sort().values


def kmeans_1d(
    values: torch.Tensor, k: int, iters: int = 30, init: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm on 1-D ``values`` (N,): ``(centroids (k,) fp32, indices (N,) int64)``.

    The values are sorted once; in one dimension each cluster is then a contiguous run of the
    sorted values, so an assignment is ``k - 1`` binary searches for the centroids' midpoints
    and a mean is a difference of prefix sums (float64). Each of at most ``iters`` rounds moves
    the centroids to their clusters' means and reassigns every value to its nearest centroid,
    stopping early once the assignment no longer changes; the within-cluster sum of squares
    never increases. ``iters=0`` returns the initial centroids with the nearest assignment.
    An empty cluster is re-seeded at the value worst represented (it keeps its centroid once
    every value is exact, e.g. with more clusters than distinct values). Deterministic; the
    centroids are ascending and the returned indices always point to the nearest returned
    centroid (ties at a midpoint go to the upper one).
    """
    _check_kmeans_args(values, k, iters, init)
    sv, order = values.detach().reshape(-1).double().sort(stable=True)  # (N,), (N,)
    prefix = F.pad(sv.cumsum(0), (1, 0))  # (N + 1,)
    centroids = initial_centroids(sv, k, init)  # (k,)
    cuts = _cuts(sv, centroids)  # (k + 1,)
    for _ in range(iters):
        centroids = _lloyd_step(sv, prefix, cuts, centroids)
        moved = _cuts(sv, centroids)
        if torch.equal(moved, cuts):
            break
        cuts = moved
    labels = torch.repeat_interleave(torch.arange(k, device=sv.device), cuts.diff())  # (N,) sorted
    indices = torch.empty_like(labels)
    indices[order] = labels  # (N,) in the input order
    return centroids.float(), indices


def _check_kmeans_args(values: torch.Tensor, k: int, iters: int, init: str) -> None:
    if values.numel() == 0 or not values.is_floating_point():
        raise ValueError(
            f"values: need a non-empty float tensor; got {values.dtype} {values.shape}"
        )
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values: contain NaN or Inf")
    if k < 1:
        raise ValueError(f"k: got {k}; allowed: >= 1")
    if iters < 0:
        raise ValueError(f"iters: got {iters}; allowed: >= 0")
    if init not in INITS:
        raise ValueError(f"init: got {init!r}; allowed: {', '.join(INITS)}")


def cluster_sse(values: torch.Tensor, centroids: torch.Tensor, indices: torch.Tensor) -> float:
    """Within-cluster sum of squared errors of ``values`` (N,) coded as ``centroids[indices]``."""
    err = values.detach().reshape(-1).double() - centroids.double()[indices.reshape(-1)]  # (N,)
    return float((err * err).sum())


@dataclasses.dataclass(frozen=True)
class CodebookFormat(WeightFormat, kind="codebook", packed=("indices",), stream_count=1):
    """A ``2**bits``-value codebook and a packed index per weight."""

    bits: int = 4

    def __post_init__(self) -> None:
        codebook_size(self.bits)  # validates bits

    @property
    def n_indices(self) -> int:
        return math.prod(self.shape)

    def layout(self) -> dict[str, Slot | None]:
        size = packing.packed_bytes(self.n_indices, self.bits)
        return {
            "codebook": Slot((codebook_size(self.bits),)),
            "indices": Slot((size,), torch.uint8),
        }

    def from_clusters(self, codebook: torch.Tensor, indices: torch.Tensor) -> dict[str, Any]:
        """The stored tensors for ``codebook`` (2**bits,) and an index per stored value."""
        k, n = codebook_size(self.bits), self.n_indices
        if codebook.numel() != k:
            raise ValueError(f"codebook of {codebook.numel()} values, expected {k}")
        if indices.numel() != n:
            raise ValueError(f"{indices.numel()} indices, expected {n}")
        flat = indices.reshape(-1).long()  # (n,)
        if n and (int(flat.min()) < 0 or int(flat.max()) >= k):
            raise ValueError(f"indices outside [0, {k - 1}]")
        return {
            "codebook": codebook.reshape(-1),
            "indices": packing.pack(flat.to(torch.uint8), self.bits),
        }

    def encode(self, w: torch.Tensor, iters: int = 30, init: str = "linear") -> dict[str, Any]:
        """Cluster ``w`` (Lloyd, ``iters`` rounds at most, ``init`` seeding)."""
        values = w.detach().float().reshape(-1)
        centroids, idx = kmeans_1d(values, codebook_size(self.bits), iters, init)
        return self.from_clusters(centroids, idx)

    def unpack(self, t: Tensors) -> torch.Tensor:
        """The codebook index of every stored value, int64 (n,)."""
        return packing.unpack(t["indices"], self.bits, self.n_indices).long()

    def decode(self, t: Tensors, unpacked: Any = None) -> torch.Tensor:
        idx = self.unpack(t) if unpacked is None else unpacked
        return t["codebook"].gather(0, idx).reshape(self.shape)

    def stream_kinds(self) -> list[StreamKind]:
        return [StreamKind("indices", self.bits)]

    def streams(self, t: Tensors) -> list[Stream]:
        return [self.stream_kinds()[0].of(self.unpack(t).to(torch.uint8))]

    def from_streams(self, t: Tensors, symbols: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"indices": packing.pack(symbols[0], self.bits)}

    def describe(self) -> str:
        k = codebook_size(self.bits)
        return f"{self.bits}-bit k-means codebook ({k} shared values), indices packed"


@dataclasses.dataclass(frozen=True)
class SparseCodebookFormat(CodebookFormat, kind="sparse-codebook", stream_count=2):
    """A codebook over the ``nnz`` kept weights of a sparse weight, with its bitmask."""

    nnz: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.nnz <= math.prod(self.shape):
            raise ValueError(f"nnz={self.nnz} is not within the weight's {math.prod(self.shape)}")

    @property
    def n_indices(self) -> int:
        return self.nnz

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def layout(self) -> dict[str, Slot | None]:
        return {**super().layout(), "mask": Slot(((self.numel + 7) // 8,), torch.uint8)}

    def encode_kept(
        self, values: torch.Tensor, keep: torch.Tensor, iters: int = 30
    ) -> dict[str, Any]:
        """Cluster the kept ``values`` (nnz,); ``keep`` marks their places in the weight."""
        flat = keep.reshape(-1).bool()
        if int(flat.sum()) != self.nnz or values.numel() != self.nnz:
            raise ValueError(
                f"{values.numel()} values for {int(flat.sum())} kept, expected {self.nnz}"
            )
        k = codebook_size(self.bits)
        if self.nnz:
            centroids, idx = kmeans_1d(values.detach().float().reshape(-1), k, iters, "linear")
        else:
            centroids, idx = torch.zeros(k), torch.zeros(0, dtype=torch.long)
        return {**self.from_clusters(centroids, idx), "mask": pack_mask(flat)}

    def encode(self, w: torch.Tensor, iters: int = 30, init: str = "linear") -> dict[str, Any]:
        keep = w.reshape(-1) != 0
        return self.encode_kept(w.reshape(-1)[keep], keep, iters)

    def decode(self, t: Tensors, unpacked: Any = None) -> torch.Tensor:
        """Zeros with ``codebook[indices]`` at the kept places (differentiable in the
        codebook)."""
        keep = unpack_mask(t["mask"], self.numel)  # (numel,)
        idx = self.unpack(t) if unpacked is None else unpacked
        kept = t["codebook"].gather(0, idx)  # (nnz,)
        return kept.new_zeros(self.numel).masked_scatter(keep, kept).reshape(self.shape)

    def stream_kinds(self) -> list[StreamKind]:
        mask = StreamKind("mask", 8, bitmask=True, n_weights=self.numel)
        return [*super().stream_kinds(), mask]

    def streams(self, t: Tensors) -> list[Stream]:
        return [*super().streams(t), self.stream_kinds()[1].of(t["mask"].clone())]

    def from_streams(self, t: Tensors, symbols: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**super().from_streams(t, symbols[:1]), "mask": symbols[1]}

    def verify(self, t: Tensors) -> None:
        check_mask(t["mask"], self.numel, self.nnz)

    def n_values(self) -> int:
        return self.nnz

    def describe(self) -> str:
        k = codebook_size(self.bits)
        return (
            f"sparse weights (bitmask), kept ones from a {self.bits}-bit k-means codebook "
            f"({k} shared values), indices packed"
        )
