"""Sparse layers: Linear and Conv2d whose weight is held in the sparse format (the kept
weights + a packed bitmask, with an optional N:M pattern: :mod:`slimkit.formats.sparse`), so
the size on disk falls with the density. The spec records ``nnz`` and the pattern.

``SparseConv2d`` executes with the dense float kernel (the dense weight is rebuilt once, after
loading, and kept). ``SparseLinear`` has a ``kernel`` (in its spec; ``SLIMKIT_SPARSE_KERNEL``
overrides it at run time):

- ``dense``: the dense weight, rebuilt once and kept, through ``F.linear``;
- ``csr``: ``torch.sparse.mm`` on a CSR view of the layer (row offsets and int32 column
  indices built once from the mask, the stored ``values`` as its values); the dense weight
  is not kept;
- ``auto`` (default): dense at densities above ``CSR_MAX_DENSITY``, where CSR never pays on
  CPU; otherwise, the first time the layer sees a number of input rows (rounded up to a power
  of two), both kernels are timed on that input and the faster one runs for that bucket from
  then on (``kernels_used()``); buckets of less than ``AUTO_MIN_MACS`` multiply-adds run
  dense untimed. The choice is per machine and never saved, so two copies of a layer may
  choose differently (their outputs then agree to float rounding, not bit for bit).

While autograd is needed (fine-tuning the values, or an input requiring gradients) the dense
kernel runs, whatever the setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import compressed_module
from slimkit.formats.base import WeightFormat
from slimkit.formats.bitmask import unpack_mask
from slimkit.formats.sparse import SparseFormat
from slimkit.layers.shapes import Conv2dOp, LinearOp, check_twins
from slimkit.layers.weight import FormatWeight
from slimkit.spec_rules import Rule, spec_choice


class SparseKernel(str, enum.Enum):
    """How a ``SparseLinear`` runs; ``SLIMKIT_SPARSE_KERNEL`` overrides a layer's."""

    AUTO, DENSE, CSR = "auto", "dense", "csr"


SPARSE_KERNELS = tuple(k.value for k in SparseKernel)
#: above this density ``auto`` runs the dense kernel without measuring
CSR_MAX_DENSITY = 0.3
#: below this many multiply-adds per call (out x in x rows bucket) ``auto`` runs the dense
#: kernel without measuring: CSR's fixed cost per call outweighs any saving there, and timing
#: calls of a few microseconds would pick by noise
AUTO_MIN_MACS = 2**18
KERNEL_ENV = "SLIMKIT_SPARSE_KERNEL"


def check_kernel(kernel: str) -> str:
    """``kernel`` when it is one of ``SPARSE_KERNELS``; ValueError otherwise."""
    if kernel not in SPARSE_KERNELS:
        raise ValueError(f"sparse kernel {kernel!r}; allowed: {', '.join(SPARSE_KERNELS)}")
    return kernel


def resolve_kernel(kernel: str) -> str:
    """The kernel setting in force: ``SLIMKIT_SPARSE_KERNEL`` when set, else ``kernel``."""
    return check_kernel(os.environ.get(KERNEL_ENV) or kernel)


def row_bucket(rows: int) -> int:
    """``rows`` rounded up to a power of two (1 for 0 or 1)."""
    return 1 << max(0, rows - 1).bit_length()


def time_kernels(runs: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Seconds per call of each function: one warm call, then the median of ``repeats``."""
    out = {}
    for name, fn in runs.items():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


class _SparseWeight(FormatWeight):
    """A layer whose weight is held in the sparse format (:class:`SparseFormat`), with the
    spec keys of its first version; the dense weight is built once and kept."""

    format: SparseFormat
    runs_as = "run with the dense kernel"
    values: torch.Tensor
    mask: torch.Tensor
    dense: torch.Tensor | None

    @classmethod
    def format_class(cls, spec: dict[str, Any]) -> type[WeightFormat]:
        return SparseFormat

    def _init_storage(self, shape: tuple[int, ...], nnz: int, pattern: str | None = None) -> None:
        self._init_format(SparseFormat(tuple(shape), nnz, pattern))
        self.register_buffer("dense", None, persistent=False)

    @property
    def pattern(self) -> str | None:
        return self.format.pattern

    def storage_spec(self) -> dict[str, Any]:
        return self.format.options()

    def store(self, tensors: dict[str, torch.Tensor]) -> None:
        super().store(tensors)
        self._reset_caches()
        self._forget_choices()

    def set_weight(self, w: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Store the weights of ``w`` that ``keep`` marks (its nonzeros when ``keep`` is None);
        ``keep`` must follow the layer's pattern when it has one. A count other than the
        layer's resizes it."""
        keep = w.detach() != 0 if keep is None else keep
        nnz = int(keep.sum())
        if nnz != self.format.nnz:
            self._init_format(dataclasses.replace(self.format, nnz=nnz))
        self.store(self.format.encode(w, keep))

    @classmethod
    def from_float(
        cls, m: nn.Module, keep: torch.Tensor | None = None, **options: Any
    ) -> _SparseWeight:
        """The layer holding ``m``'s weights marked by ``keep`` (default: its nonzeros);
        ``options``: ``pattern``, and a Linear's ``kernel``."""
        w = m.weight
        assert isinstance(w, torch.Tensor)
        nnz = int((w != 0).sum() if keep is None else keep.sum())
        s: _SparseWeight = cls.empty_like(m, nnz=nnz, **options)  # type: ignore[attr-defined]
        s.set_weight(w, keep)
        return s

    def _reset_caches(self) -> None:
        """Drop what is derived from values + mask (rebuilt when next needed)."""
        self.dense = None

    def _forget_choices(self) -> None:
        """Drop measured kernel choices (none here)."""

    def dense_weight(self) -> torch.Tensor:
        """The dense weight, built once and kept; while the values are a parameter
        (:meth:`values_to_parameter`) it is rebuilt on every call, differentiably."""
        if isinstance(self.values, nn.Parameter):
            return super().dense_weight()
        if self.dense is None:
            self.dense = self.format.decode(
                {"values": self.values.detach(), "mask": self.mask}, self.unpacked()
            )
        return self.dense

    # -- fine-tuning: the kept values become a parameter for a while ---------------------
    def values_to_parameter(self) -> nn.Parameter:
        """Turn the ``values`` buffer into a trainable parameter and return it; the mask
        stays as it is, so pruned weights stay exactly zero."""
        value = self._buffers.pop("values")
        assert value is not None
        param = nn.Parameter(value.detach().clone())
        self.register_parameter("values", param)
        self._reset_caches()
        return param

    def values_to_buffer(self) -> None:
        """Undo :meth:`values_to_parameter` (keeping the trained values)."""
        param = self._parameters.pop("values", None)
        if param is not None:
            self.register_buffer("values", param.detach().clone())
        self._reset_caches()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._reset_caches()

    def density(self) -> float:
        return self.values.numel() / max(1, int(torch.Size(self.weight_shape).numel()))

    def storage_text(self) -> str:
        return self.format.describe()


@compressed_module
class SparseLinear(LinearOp, _SparseWeight):
    """A sparse Linear run by its ``kernel``: auto, dense or csr (see the module docstring)."""

    csr_crow: torch.Tensor | None
    csr_col: torch.Tensor | None
    spec_rules: ClassVar[dict[str, Rule]] = {"kernel": spec_choice(*SPARSE_KERNELS)}

    def __init__(self, kernel: str = "auto", **shape: Any) -> None:
        super().__init__(**shape)
        self.kernel = check_kernel(kernel)
        self.register_buffer("csr_crow", None, persistent=False)
        self.register_buffer("csr_col", None, persistent=False)
        self._csr_key: tuple[int, int, int] | None = None
        self._choices: dict[int, str] = {}

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "kernel": self.kernel}

    # -- kernels ---------------------------------------------------------------------------
    def _reset_caches(self) -> None:
        super()._reset_caches()
        self.csr_crow = self.csr_col = None
        self._csr_key = None

    def _forget_choices(self) -> None:
        self._choices = {}

    def kernels_used(self) -> dict[int, str]:
        """The kernel ``auto`` chose for each bucket of input rows seen so far (a bucket
        ``b`` holds the calls of ``b / 2 < rows <= b`` rows)."""
        return dict(self._choices)

    def csr_weight(self) -> torch.Tensor:
        """The weight as a CSR tensor over the stored values; its row offsets and column
        indices are built once from the mask (again after the mask changes)."""
        key = (id(self.mask), self.mask._version, self.values.numel())
        if self.csr_crow is None or self.csr_col is None or self._csr_key != key:
            rows = unpack_mask(self.mask, self.out_features * self.in_features)
            rows = rows.reshape(self.out_features, self.in_features)
            index = torch.int32 if rows.numel() < 2**31 else torch.int64
            crow = torch.zeros(self.out_features + 1, dtype=torch.int64)
            torch.cumsum(rows.sum(dim=1), dim=0, out=crow[1:])
            self.csr_crow = crow.to(index)
            self.csr_col = rows.nonzero()[:, 1].to(index)  # row-major, the order of values
            self._csr_key = key
            with warnings.catch_warnings():  # torch's one-time "beta" notice
                warnings.simplefilter("ignore", UserWarning)
                return self._wrap_csr()
        return self._wrap_csr()

    def _wrap_csr(self) -> torch.Tensor:
        assert self.csr_crow is not None and self.csr_col is not None
        shape = (self.out_features, self.in_features)
        return torch.sparse_csr_tensor(
            self.csr_crow, self.csr_col, self.values, shape, check_invariants=False
        )

    def _csr_linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        y = torch.sparse.mm(self.csr_weight(), rows.t()).t()  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dense_linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def _keep_only(self, kernel: str) -> None:
        """Drop the other kernel's cached form of the weight."""
        if kernel == "csr":
            if self.dense is not None:
                self.dense = None
        elif self.csr_crow is not None:
            self.csr_crow = self.csr_col = None
            self._csr_key = None

    def _measure(self, x: torch.Tensor) -> str:
        """The faster kernel on ``x``, both timed under no_grad (dense on a tie)."""
        with torch.no_grad():
            seconds = time_kernels(
                {"dense": lambda: self._dense_linear(x), "csr": lambda: self._csr_linear(x)}
            )
        return "csr" if seconds["csr"] < seconds["dense"] else "dense"

    def kernel_for(self, x: torch.Tensor) -> str:
        """The kernel that runs on ``x``: dense while autograd is needed or for the dense
        setting, csr for the csr setting; for auto, dense above ``CSR_MAX_DENSITY``, else the
        choice for ``x``'s row bucket, made now when it has none yet (dense below
        ``AUTO_MIN_MACS``, else the faster of both timed on ``x``)."""
        setting = resolve_kernel(self.kernel)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or isinstance(self.values, nn.Parameter)
        )
        if needs_grad:
            return "dense"
        if setting != "auto":
            self._keep_only(setting)
            return setting
        rows = x.numel() // self.in_features
        if self.density() > CSR_MAX_DENSITY or rows == 0:
            return "dense"
        bucket = row_bucket(rows)
        choice = self._choices.get(bucket)
        if choice is None:
            small = bucket * self.in_features * self.out_features < AUTO_MIN_MACS
            choice = self._choices[bucket] = "dense" if small else self._measure(x)
            chosen = set(self._choices.values())
            if len(chosen) == 1:
                self._keep_only(choice)
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_for(x) == "csr":
            return self._csr_linear(x)
        return self._dense_linear(x)

    def describe(self) -> str:
        setting = resolve_kernel(self.kernel)
        if setting == "csr":
            return f"{self.storage_text()}, run with a CSR sparse kernel"
        if setting == "dense":
            return f"{self.storage_text()}, run with the dense kernel"
        if self.density() > CSR_MAX_DENSITY:
            return (
                f"{self.storage_text()}, run with the dense kernel "
                f"(density {self.density():.2f} > {CSR_MAX_DENSITY}: CSR never pays)"
            )
        chosen = ", ".join(f"{k} for {rows} rows" for rows, k in sorted(self._choices.items()))
        return (
            f"{self.storage_text()}, kernel chosen by measurement per batch size "
            f"(dense untimed below {AUTO_MIN_MACS} multiply-adds a call): "
            f"{chosen or 'not yet measured'}"
        )


@compressed_module
class SparseConv2d(Conv2dOp, _SparseWeight):
    pass


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
    check_twins(model, names, SPARSE_SWAPS, method, "pruned")


def to_sparse(
    module: nn.Module,
    keep: torch.Tensor | None = None,
    pattern: str | None = None,
    kernel: str = "auto",
) -> SparseLinear | SparseConv2d:
    """The sparse twin of a Linear or Conv2d holding the weights ``keep`` marks (default:
    the nonzeros); ``kernel`` is a Linear's (a Conv2d always runs the dense kernel)."""
    twin = SPARSE_SWAPS[type(module)]
    options: dict[str, Any] = {"pattern": pattern}
    if twin is SparseLinear:
        options["kernel"] = kernel
    else:
        check_kernel(kernel)
    layer: SparseLinear | SparseConv2d = twin.from_float(module, keep, **options)  # type: ignore[assignment]
    return layer
