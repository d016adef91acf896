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
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import ConvGeometry, compressed_module, conv_args, copy_bias
from slimkit.formats.base import WeightFormat
from slimkit.formats.bitmask import unpack_mask
from slimkit.formats.codebook import CodebookFormat, SparseCodebookFormat
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

    def _init_storage(self, shape: tuple[int, ...], bits: int) -> None:
        self._init_format(CodebookFormat(tuple(shape), bits))

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
    """A pruned layer whose kept weights share a codebook (:class:`SparseCodebookFormat`):
    ``codebook`` (2**bits,), ``indices`` (packed, one per kept weight, in mask order) and
    ``mask`` (one bit per weight). Pruned weights are exactly zero."""

    format: SparseCodebookFormat  # type: ignore[assignment]

    @classmethod
    def format_class(cls, spec: dict[str, Any]) -> type[WeightFormat]:
        return SparseCodebookFormat

    runs_as = "dense fp32 kernel"
    mask: torch.Tensor

    def _init_sparse(self, nnz: int) -> None:
        """Store ``nnz`` kept weights' indices and the bitmask instead of dense indices."""
        self._init_format(SparseCodebookFormat(self.format.shape, self.format.bits, nnz))

    @property
    def nnz(self) -> int:
        return self.format.nnz

    def set_sparse(self, values: torch.Tensor, keep: torch.Tensor, iters: int = 30) -> None:
        """Cluster the kept ``values`` (nnz,) into the codebook; ``keep`` marks their places."""
        self.store(self.format.encode_kept(values, keep, iters))


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
