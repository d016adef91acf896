"""Codebook (k-means) layers: Linear and Conv2d whose weight is held in the codebook format
(:mod:`slimkit.formats.codebook`), dense or over the kept weights of a sparse layer.

The forward gathers the codebook into the dense weight and runs the float kernel; the
unpacked indices are cached (int64, refreshed when the packed buffer changes). During
codebook fine-tuning the codebook is a parameter (``trainable_codebooks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.compressed import compressed_modules
from slimkit.formats.base import WeightFormat
from slimkit.formats.bitmask import unpack_mask
from slimkit.formats.codebook import CodebookFormat, SparseCodebookFormat
from slimkit.layers.shapes import Conv2dOp, LinearOp
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.layers.weight import FormatWeight


# -- compressed layers ----------------------------------------------------------------------
class KMeansWeight(FormatWeight):
    """A layer whose weight is a codebook + packed per-weight indices (:class:`CodebookFormat`),
    with the spec keys of its first version."""

    format: CodebookFormat

    @classmethod
    def format_class(cls, spec: dict[str, Any]) -> type[WeightFormat]:
        return CodebookFormat

    runs_as = "weights gathered for the fp32 kernel"
    codebook: torch.Tensor
    indices: torch.Tensor

    def _init_storage(self, shape: tuple[int, ...], bits: int = 4) -> None:
        self._init_format(CodebookFormat(tuple(shape), bits))

    def storage_spec(self) -> dict[str, Any]:
        return {"bits": self.bits}

    @property
    def bits(self) -> int:
        return self.format.bits

    def index_tensor(self) -> torch.Tensor:
        """The codebook index of every stored weight, int64 (unpacked once, cached while the
        packed buffer is the same tensor at the same version)."""
        idx: torch.Tensor = self.unpacked()
        return idx

    def set_clustered(self, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        """Store ``codebook`` (2**bits,) and the index of every weight (any shape, n values)."""
        self.store(self.format.from_clusters(codebook, indices))

    def set_weight(self, w: torch.Tensor, iters: int = 30, init: str = "linear") -> None:
        """Cluster the float weight ``w`` into this layer's codebook and indices."""
        self.store(self.format.encode(w, iters, init))

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


class KMeansLinear(LinearOp, KMeansWeight):
    """A Linear whose weight is a codebook and an index per weight."""


class KMeansConv2d(Conv2dOp, KMeansWeight):
    """A Conv2d whose weight is a codebook and an index per weight."""


compressed_modules(KMeansLinear, KMeansConv2d)


#: float layer type -> its k-means twin
KMEANS_SWAPS: dict[type[nn.Module], type[KMeansLinear | KMeansConv2d]] = {
    nn.Linear: KMeansLinear,
    nn.Conv2d: KMeansConv2d,
}


# -- k-means over the kept weights of a sparse layer (Deep Compression) ----------------------
class SparseKMeansWeight(KMeansWeight):
    """A pruned layer whose kept weights share a codebook (:class:`SparseCodebookFormat`):
    ``codebook`` (2**bits,), ``indices`` (packed, one per kept weight, in mask order) and
    ``mask`` (one bit per weight). Pruned weights are exactly zero."""

    format: SparseCodebookFormat  # type: ignore[assignment]

    @classmethod
    def format_class(cls, spec: dict[str, Any]) -> type[WeightFormat]:
        return SparseCodebookFormat

    runs_as = "dense fp32 kernel"
    mask: torch.Tensor

    def _init_storage(self, shape: tuple[int, ...], nnz: int, bits: int = 4) -> None:  # type: ignore[override]
        self._init_format(SparseCodebookFormat(tuple(shape), bits, nnz))

    def storage_spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "nnz": self.nnz}

    @property
    def nnz(self) -> int:
        return self.format.nnz

    def set_sparse(self, values: torch.Tensor, keep: torch.Tensor, iters: int = 30) -> None:
        """Cluster the kept ``values`` (nnz,) into the codebook; ``keep`` marks their places."""
        self.store(self.format.encode_kept(values, keep, iters))


class SparseKMeansLinear(LinearOp, SparseKMeansWeight):
    """A pruned Linear whose kept weights share a codebook."""


class SparseKMeansConv2d(Conv2dOp, SparseKMeansWeight):
    """A pruned Conv2d whose kept weights share a codebook."""


compressed_modules(SparseKMeansLinear, SparseKMeansConv2d)


def sparse_kmeans_twin(
    m: SparseLinear | SparseConv2d, bits: int, iters: int = 30
) -> SparseKMeansLinear | SparseKMeansConv2d:
    """The k-means form of a sparse layer: same mask, kept values clustered, bias copied."""
    numel = int(torch.Size(m.weight_shape).numel())
    keep = unpack_mask(m.mask, numel)
    twin = SparseKMeansLinear if isinstance(m, SparseLinear) else SparseKMeansConv2d
    q: SparseKMeansLinear | SparseKMeansConv2d = twin.empty_like(m, nnz=m.values.numel(), bits=bits)
    q.set_sparse(m.values, keep, iters)
    return q


@contextlib.contextmanager
def trainable_codebooks(layers: Sequence[KMeansWeight]) -> Iterator[list[nn.Parameter]]:
    """The layers' codebooks as parameters inside the block, buffers again after it."""
    try:
        yield [layer.codebook_to_parameter() for layer in layers]
    finally:
        for layer in layers:
            layer.codebook_to_buffer()
