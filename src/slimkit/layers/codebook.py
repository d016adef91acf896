"""Codebook (k-means) weight sharing: a few shared float values per layer, each weight an
index into them (Deep Compression).

Each layer's weights are clustered into ``2**bits`` groups by Lloyd's algorithm in one
dimension; every weight is then replaced by its cluster's centroid. A layer stores

- ``codebook`` (fp32, (2**bits,)): the shared values;
- ``indices`` (uint8, (ceil(n * bits / 8),)): the codebook index of each of the ``n`` weights,
  bit-packed with :mod:`slimkit.layers.packing`,

so the artifact's size shows the bits. The forward gathers the codebook into the dense weight
and runs the float kernel; the unpacked indices are cached (int64, refreshed when the packed
buffer changes). A sparse layer's kept values may be clustered the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import (
    CompressedModule,
    ConvGeometry,
    compressed_module,
    conv_args,
    copy_bias,
)
from slimkit.layers import packing
from slimkit.layers.bitmask import check_mask, pack_mask, unpack_mask
from slimkit.layers.sparse import SparseConv2d, SparseLinear

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


# -- compressed layers ----------------------------------------------------------------------
class KMeansWeight(CompressedModule):
    """Shared storage of a layer whose weight is a codebook + packed per-weight indices."""

    codebook: torch.Tensor
    indices: torch.Tensor

    def _init_storage(self, shape: tuple[int, ...], bits: int) -> None:
        k = codebook_size(bits)  # validates bits
        self.bits = bits
        self.weight_shape = tuple(shape)
        n = int(torch.Size(shape).numel())
        self.register_buffer("codebook", torch.zeros(k))
        self.register_buffer(
            "indices", torch.zeros(packing.packed_bytes(n, bits), dtype=torch.uint8)
        )
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def index_tensor(self) -> torch.Tensor:
        """The codebook index of every weight, int64 (n,) (unpacked once, cached while the
        packed buffer is the same tensor at the same version)."""
        packed = self.indices
        cache = self._cache
        if cache is None or cache[0] is not packed or cache[1] != packed._version:
            n = int(torch.Size(self.weight_shape).numel())
            idx = packing.unpack(packed, self.bits, n).long()  # (n,)
            self._cache = cache = (packed, packed._version, idx)
        return cache[2]

    def set_clustered(self, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        """Store ``codebook`` (2**bits,) and the index of every weight (any shape, n values)."""
        k, n = self.codebook.numel(), int(torch.Size(self.weight_shape).numel())
        if codebook.numel() != k:
            raise ValueError(f"codebook of {codebook.numel()} values, expected {k}")
        if indices.numel() != n:
            raise ValueError(f"{indices.numel()} indices, expected {n}")
        flat = indices.reshape(-1).long()  # (n,)
        if int(flat.min()) < 0 or int(flat.max()) >= k:
            raise ValueError(f"indices outside [0, {k - 1}]")
        with torch.no_grad():
            self.codebook.copy_(codebook.reshape(-1))
            self.indices.copy_(packing.pack(flat.to(torch.uint8), self.bits))
        self._cache = None

    def set_weight(self, w: torch.Tensor, iters: int = 30, init: str = "linear") -> None:
        """Cluster the float weight ``w`` into this layer's codebook and indices."""
        centroids, idx = kmeans_1d(
            w.detach().float().reshape(-1), self.codebook.numel(), iters, init
        )
        self.set_clustered(centroids, idx)

    def dense_weight(self) -> torch.Tensor:
        """``codebook[indices]`` as a gather (far faster than advanced indexing on CPU); its
        backward scatter-adds each weight's gradient into its shared value."""
        w = self.codebook.gather(0, self.index_tensor())  # (n,)
        return w.reshape(self.weight_shape)

    # -- fine-tuning: the codebook becomes a parameter for a while -----------------------
    def codebook_to_parameter(self) -> nn.Parameter:
        """Turn the ``codebook`` buffer into a trainable parameter and return it."""
        value = self._buffers.pop("codebook")
        assert value is not None
        param = nn.Parameter(value.detach().clone())
        self.register_parameter("codebook", param)
        return param

    def codebook_to_buffer(self) -> None:
        """Undo :meth:`codebook_to_parameter` (keeping the trained values)."""
        param = self._parameters.pop("codebook", None)
        if param is not None:
            self.register_buffer("codebook", param.detach().clone())

    def n_params(self) -> int:
        return int(torch.Size(self.weight_shape).numel())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def describe(self) -> str:
        return (
            f"{self.bits}-bit k-means codebook ({self.codebook.numel()} shared values), "
            "indices packed, weights gathered for the fp32 kernel"
        )


@compressed_module
class KMeansLinear(KMeansWeight):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), bits)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def empty_like(cls, m: nn.Linear, bits: int = 4) -> KMeansLinear:
        """A layer of ``m``'s shape and bias, its codebook and indices still to be set."""
        q = cls(m.in_features, m.out_features, m.bias is not None, bits)
        copy_bias(m, q)
        return q

    @classmethod
    def from_float(
        cls, m: nn.Linear, bits: int = 4, iters: int = 30, init: str = "linear"
    ) -> KMeansLinear:
        q = cls.empty_like(m, bits)
        q.set_weight(m.weight, iters, init)
        return q

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "bits": self.bits,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}"


@compressed_module
class KMeansConv2d(KMeansWeight, ConvGeometry):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int] | tuple[int, int],
        stride: list[int] | tuple[int, int] = (1, 1),
        padding: list[int] | tuple[int, int] = (0, 0),
        dilation: list[int] | tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        bits: int = 4,
    ) -> None:
        super().__init__()
        shape = self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        self._init_storage(shape, bits)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def empty_like(cls, m: nn.Conv2d, bits: int = 4) -> KMeansConv2d:
        q = cls(**conv_args(m), bias=m.bias is not None, bits=bits)
        copy_bias(m, q)
        return q

    @classmethod
    def from_float(
        cls, m: nn.Conv2d, bits: int = 4, iters: int = 30, init: str = "linear"
    ) -> KMeansConv2d:
        q = cls.empty_like(m, bits)
        q.set_weight(m.weight, iters, init)
        return q

    def spec(self) -> dict[str, Any]:
        return {**self.geometry_spec(), "bias": self.bias is not None, "bits": self.bits}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.dense_weight(), self.bias)


#: float layer type -> its k-means twin
KMEANS_SWAPS: dict[type[nn.Module], type[KMeansLinear | KMeansConv2d]] = {
    nn.Linear: KMeansLinear,
    nn.Conv2d: KMeansConv2d,
}


# -- k-means over the kept weights of a sparse layer (Deep Compression) ----------------------
class SparseKMeansWeight(KMeansWeight):
    """A pruned layer whose kept weights share a codebook: ``codebook`` (2**bits,), ``indices``
    (packed, one per kept weight, in mask order) and ``mask`` (one bit per weight). Pruned
    weights are exactly zero; the codebook never holds them."""

    mask: torch.Tensor

    def _init_sparse(self, nnz: int) -> None:
        """Resize the index storage to ``nnz`` kept weights and add the bitmask."""
        self.nnz = nnz
        numel = int(torch.Size(self.weight_shape).numel())
        size = packing.packed_bytes(nnz, self.bits)
        self.register_buffer("indices", torch.zeros(size, dtype=torch.uint8))
        self.register_buffer("mask", torch.zeros((numel + 7) // 8, dtype=torch.uint8))
        self._cache = None

    def index_tensor(self) -> torch.Tensor:
        """The codebook index of every kept weight, int64 (nnz,) (cached like the dense one)."""
        packed = self.indices
        cache = self._cache
        if cache is None or cache[0] is not packed or cache[1] != packed._version:
            idx = packing.unpack(packed, self.bits, self.nnz).long()  # (nnz,)
            self._cache = cache = (packed, packed._version, idx)
        return cache[2]

    def set_sparse(self, values: torch.Tensor, keep: torch.Tensor, iters: int = 30) -> None:
        """Cluster the kept ``values`` (nnz,) into the codebook; ``keep`` marks their places."""
        flat = keep.reshape(-1).bool()
        if int(flat.sum()) != self.nnz or values.numel() != self.nnz:
            raise ValueError(
                f"{values.numel()} values for {int(flat.sum())} kept, expected {self.nnz}"
            )
        k = self.codebook.numel()
        if self.nnz:
            centroids, idx = kmeans_1d(values.detach().float().reshape(-1), k, iters, "linear")
        else:
            centroids, idx = torch.zeros(k), torch.zeros(0, dtype=torch.long)
        with torch.no_grad():
            self.codebook.copy_(centroids)
            self.indices.copy_(packing.pack(idx.to(torch.uint8), self.bits))
            self.mask.copy_(pack_mask(flat))
        self._cache = None

    def dense_weight(self) -> torch.Tensor:
        """Zeros with ``codebook[indices]`` at the kept places (differentiable in the
        codebook, so the shared values can be fine-tuned)."""
        numel = int(torch.Size(self.weight_shape).numel())
        keep = unpack_mask(self.mask, numel)  # (numel,)
        kept = self.codebook.gather(0, self.index_tensor())  # (nnz,)
        return kept.new_zeros(numel).masked_scatter(keep, kept).reshape(self.weight_shape)

    def n_params(self) -> int:
        return self.nnz

    def verify(self) -> None:
        check_mask(self.mask, int(torch.Size(self.weight_shape).numel()), self.nnz)

    def describe(self) -> str:
        return (
            f"sparse weights (bitmask), kept ones from a {self.bits}-bit k-means codebook "
            f"({self.codebook.numel()} shared values), indices packed; dense fp32 kernel"
        )


@compressed_module
class SparseKMeansLinear(SparseKMeansWeight, KMeansLinear):
    def __init__(
        self, in_features: int, out_features: int, nnz: int, bias: bool = True, bits: int = 4
    ) -> None:
        KMeansLinear.__init__(self, in_features, out_features, bias, bits)
        self._init_sparse(nnz)

    def spec(self) -> dict[str, Any]:
        return {**KMeansLinear.spec(self), "nnz": self.nnz}


@compressed_module
class SparseKMeansConv2d(SparseKMeansWeight, KMeansConv2d):
    def __init__(self, nnz: int, **conv: Any) -> None:
        KMeansConv2d.__init__(self, **conv)
        self._init_sparse(nnz)

    def spec(self) -> dict[str, Any]:
        return {**KMeansConv2d.spec(self), "nnz": self.nnz}


def sparse_kmeans_twin(
    m: SparseLinear | SparseConv2d, bits: int, iters: int = 30
) -> SparseKMeansLinear | SparseKMeansConv2d:
    """The k-means form of a sparse layer: same mask, kept values clustered, bias copied."""
    numel = int(torch.Size(m.weight_shape).numel())
    keep = unpack_mask(m.mask, numel)
    nnz = m.values.numel()
    q: SparseKMeansLinear | SparseKMeansConv2d
    if isinstance(m, SparseLinear):
        q = SparseKMeansLinear(m.in_features, m.out_features, nnz, m.bias is not None, bits)
    else:
        conv = {**m.geometry_spec(), "bias": m.bias is not None, "bits": bits}
        q = SparseKMeansConv2d(nnz, **conv)
    q.set_sparse(m.values, keep, iters)
    copy_bias(m, q)
    return q


@contextlib.contextmanager
def trainable_codebooks(layers: Sequence[KMeansWeight]) -> Iterator[list[nn.Parameter]]:
    """The layers' codebooks as parameters inside the block, buffers again after it."""
    try:
        yield [layer.codebook_to_parameter() for layer in layers]
    finally:
        for layer in layers:
            layer.codebook_to_buffer()
