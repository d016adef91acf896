"""Sparse layers: the kept weights + a packed bitmask, so size on disk falls with density.

A layer may declare an N:M ``pattern`` ("2:4": in every group of M consecutive weights of an
output row, the row flattened as C_in / groups * kh * kw for a Conv2d, exactly N are kept);
the mask is then checked against it when the layer is built, and the spec records it. Per
group the bitmask takes M bits where in-group indices would take ``N * ceil(log2(M))``: the
same for 2:4, less for 4:8, more for sparser patterns such as 1:4.

They execute with the dense float kernel (the dense weight is rebuilt once, after loading,
and kept): at the sparsities of unstructured pruning the dense kernel is faster on CPU, and
the report's measured latency says so.
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
from slimkit.errors import ConfigError
from slimkit.prune.bitmask import pack_mask, unpack_mask


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``(n, m)`` of an ``"N:M"`` pattern with ``0 < N < M``; ValueError otherwise."""
    n_text, sep, m_text = pattern.partition(":")
    if sep and n_text.isdigit() and m_text.isdigit() and 0 < int(n_text) < int(m_text):
        return int(n_text), int(m_text)
    raise ValueError(f"pattern {pattern!r} is not 'N:M' with 0 < N < M")


def check_pattern(keep: torch.Tensor, pattern: str) -> None:
    """ValueError unless ``keep`` (C_out, ...) keeps exactly N of each M consecutive
    positions of every flattened output row."""
    n, m = parse_pattern(pattern)
    rows = keep.reshape(keep.shape[0], -1)  # (C_out, K)
    if rows.shape[1] % m or not bool((rows.reshape(len(rows), -1, m).sum(-1) == n).all()):
        raise ValueError(f"the mask does not follow the {pattern} pattern")


class _SparseWeight(CompressedModule):
    values: torch.Tensor
    mask: torch.Tensor
    dense: torch.Tensor | None

    def _init_storage(self, shape: tuple[int, ...], nnz: int, pattern: str | None) -> None:
        if pattern is not None:
            parse_pattern(pattern)
        self.weight_shape = tuple(shape)
        self.pattern = pattern
        numel = int(torch.Size(shape).numel())
        self.register_buffer("values", torch.zeros(nnz))
        self.register_buffer("mask", torch.zeros((numel + 7) // 8, dtype=torch.uint8))
        self.register_buffer("dense", None, persistent=False)

    def set_weight(self, w: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Store the weights of ``w`` that ``keep`` marks (its nonzeros when ``keep`` is None);
        the layer must have been built with their count, and ``keep`` must follow its
        pattern when it has one."""
        if keep is None:
            keep = w.detach() != 0
        if self.pattern is not None:
            check_pattern(keep.reshape(self.weight_shape), self.pattern)
        flat = keep.reshape(-1)
        self.values = w.detach().reshape(-1)[flat].float().clone()
        self.mask = pack_mask(flat)
        self.dense = None

    def dense_weight(self) -> torch.Tensor:
        """The dense weight, built once and kept; while the values are a parameter
        (:meth:`values_to_parameter`) it is rebuilt on every call, differentiably."""
        numel = int(torch.Size(self.weight_shape).numel())
        if isinstance(self.values, nn.Parameter):
            keep = unpack_mask(self.mask, numel)  # (numel,)
            w = self.values.new_zeros(numel).masked_scatter(keep, self.values)
            return w.reshape(self.weight_shape)
        if self.dense is None:
            w = torch.zeros(numel, dtype=self.values.dtype)
            w[unpack_mask(self.mask, numel)] = self.values
            self.dense = w.reshape(self.weight_shape)
        return self.dense

    # -- fine-tuning: the kept values become a parameter for a while ---------------------
    def values_to_parameter(self) -> nn.Parameter:
        """Turn the ``values`` buffer into a trainable parameter and return it; the mask
        stays as it is, so pruned weights stay exactly zero."""
        value = self._buffers.pop("values")
        assert value is not None
        param = nn.Parameter(value.detach().clone())
        self.register_parameter("values", param)
        self.dense = None
        return param

    def values_to_buffer(self) -> None:
        """Undo :meth:`values_to_parameter` (keeping the trained values)."""
        param = self._parameters.pop("values", None)
        if param is not None:
            self.register_buffer("values", param.detach().clone())
        self.dense = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.dense = None

    def n_params(self) -> int:
        return self.values.numel()

    def density(self) -> float:
        return self.values.numel() / max(1, int(torch.Size(self.weight_shape).numel()))

    def describe(self) -> str:
        kind = f"{self.pattern} semi-structured sparse" if self.pattern else "sparse"
        return f"{kind} weights (values + bitmask) on disk, run with the dense kernel"

    def pattern_spec(self) -> dict[str, Any]:
        """``{"pattern": "N:M"}`` for an N:M layer; empty otherwise (older specs have none)."""
        return {} if self.pattern is None else {"pattern": self.pattern}


@compressed_module
class SparseLinear(_SparseWeight):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        nnz: int,
        bias: bool = True,
        pattern: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), nnz, pattern)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(
        cls, m: nn.Linear, keep: torch.Tensor | None = None, pattern: str | None = None
    ) -> SparseLinear:
        """The layer holding ``m``'s weights marked by ``keep`` (default: its nonzeros)."""
        nnz = int((m.weight != 0).sum() if keep is None else keep.sum())
        s = cls(m.in_features, m.out_features, nnz, m.bias is not None, pattern)
        s.set_weight(m.weight, keep)
        copy_bias(m, s)
        return s

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "nnz": self.values.numel(),
            "bias": self.bias is not None,
            **self.pattern_spec(),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)


@compressed_module
class SparseConv2d(_SparseWeight, ConvGeometry):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int] | tuple[int, int],
        nnz: int,
        stride: list[int] | tuple[int, int] = (1, 1),
        padding: list[int] | tuple[int, int] = (0, 0),
        dilation: list[int] | tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        pattern: str | None = None,
    ) -> None:
        super().__init__()
        shape = self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        self._init_storage(shape, nnz, pattern)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_float(
        cls, m: nn.Conv2d, keep: torch.Tensor | None = None, pattern: str | None = None
    ) -> SparseConv2d:
        """The layer holding ``m``'s weights marked by ``keep`` (default: its nonzeros)."""
        nnz = int((m.weight != 0).sum() if keep is None else keep.sum())
        s = cls(nnz=nnz, bias=m.bias is not None, pattern=pattern, **conv_args(m))
        s.set_weight(m.weight, keep)
        copy_bias(m, s)
        return s

    def spec(self) -> dict[str, Any]:
        return {
            **self.geometry_spec(),
            "nnz": self.values.numel(),
            "bias": self.bias is not None,
            **self.pattern_spec(),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.dense_weight(), self.bias)


#: dense layer type -> its sparse twin
SPARSE_SWAPS: dict[type[nn.Module], type[SparseLinear | SparseConv2d]] = {
    nn.Linear: SparseLinear,
    nn.Conv2d: SparseConv2d,
}


@contextlib.contextmanager
def trainable_values(layers: Sequence[SparseLinear | SparseConv2d]) -> Iterator[list[nn.Parameter]]:
    """The layers' kept values as parameters inside the block, buffers again after it."""
    try:
        yield [layer.values_to_parameter() for layer in layers]
    finally:
        for layer in layers:
            layer.values_to_buffer()


def check_sparse_convertible(model: nn.Module, names: Sequence[str], method: str) -> None:
    """ConfigError naming the first selected layer that has no sparse twin of its form."""
    for name in names:
        module = model.get_submodule(name)
        if type(module) not in SPARSE_SWAPS:
            raise ConfigError(f"layer {name!r} ({type(module).__name__}) cannot be pruned")
        if isinstance(module, nn.Conv2d):
            try:
                conv_args(module)
            except ValueError as e:
                raise ConfigError(f"layer {name!r} cannot be pruned by {method}: {e}") from None


def to_sparse(
    module: nn.Module, keep: torch.Tensor | None = None, pattern: str | None = None
) -> SparseLinear | SparseConv2d:
    """The sparse twin of a Linear or Conv2d holding the weights ``keep`` marks (default:
    the nonzeros)."""
    return SPARSE_SWAPS[type(module)].from_float(module, keep, pattern)  # type: ignore[arg-type]
