"""Layers whose weight is held in a weight format: one layer per operation (Linear, Conv2d,
Embedding), any format (:mod:`slimkit.formats`).

The format's tensors are the layer's buffers, under the format's names; the layer caches
what the format unpacks from them (the integer codes) while the packed tensors do not change,
and computes with the decoded float weight: no integer kernel is claimed here, the report's
measured latency says what it costs.

``FormatLinear``, ``FormatConv2d`` and ``FormatEmbedding`` record the format in their spec
(``{"kind": ..., **options}``); the older per-format layers (``QuantLinear``, ``KMeansLinear``,
...) are the same layers with a fixed format and their own spec keys.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.compressed import CompressedModule, StreamKind, compressed_modules
from slimkit.formats.base import (
    Stream,
    WeightFormat,
    check_format,
    format_class,
    format_from_spec,
)
from slimkit.layers.shapes import Conv2dOp, EmbeddingOp, LinearOp


class FormatWeight(CompressedModule):
    """A layer whose weight is stored in ``self.format`` (see the module docstring)."""

    format: WeightFormat
    has_streams = True
    #: how the layer computes, after the format's description
    runs_as: ClassVar[str] = "dequantized on the fly for the fp32 kernel"

    def _init_format(self, fmt: WeightFormat) -> None:
        self.format = fmt
        for name, slot in fmt.layout().items():
            self.register_buffer(name, None if slot is None else slot.empty())
        self._unpacked: tuple[tuple[tuple[int, int], ...], Any] | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.format.shape

    def stored(self) -> dict[str, torch.Tensor]:
        """The format's tensors as this layer holds them (buffers, or parameters while a
        training stage has made one trainable)."""
        out = {}
        for name in self.format.layout():
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    def store(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (some of the format's) into this layer's storage."""
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(self, name).copy_(value)
        self._unpacked = None

    def set_weight(self, w: torch.Tensor) -> None:
        """Store the float weight ``w`` in this layer's format."""
        self.store(self.format.encode(w))

    @classmethod
    def from_float(cls, m: nn.Module, **options: Any) -> Any:
        """``m`` with its weight stored in this layer's format (``options``: the storage's;
        the class is a :class:`~slimkit.layers.shapes.LayerOp` too)."""
        q = cls.empty_like(m, **options)  # type: ignore[attr-defined]
        q.set_weight(m.weight)
        return q

    def unpacked(self) -> Any:
        """``format.unpack`` of the stored tensors, cached while its inputs do not change."""
        t = self.stored()
        key = tuple((id(t[n]), t[n]._version) for n in self.format.packed if n in t)
        if self._unpacked is None or self._unpacked[0] != key:
            self._unpacked = (key, self.format.unpack(t))
        return self._unpacked[1]

    def dense_weight(self) -> torch.Tensor:
        return self.format.decode(self.stored(), self.unpacked())

    def kernel_weight(self) -> torch.Tensor:
        """The weight the kernel runs with: the format's native tensor where this CPU
        computes in its dtype, else the decoded fp32 weight."""
        stored = self.stored()
        native = self.format.native(stored)
        return self.format.decode(stored, self.unpacked()) if native is None else native

    @classmethod
    def stream_count(cls, spec: dict[str, Any]) -> int:
        return cls.format_class(spec).stream_count

    @classmethod
    def format_class(cls, spec: dict[str, Any]) -> type[WeightFormat]:
        """The format class a (checked) spec of this layer stands for."""
        raise NotImplementedError

    def stream_kinds(self) -> list[StreamKind]:
        return self.format.stream_kinds()

    def streams(self) -> list[Stream]:
        """The format's integer streams (for entropy coding)."""
        return self.format.streams(self.stored())

    def set_streams(self, symbols: list[torch.Tensor]) -> None:
        """Store the tensors the streams ``symbols`` stand for (inverse of ``streams``)."""
        self.store(self.format.from_streams(self.stored(), symbols))

    def verify(self) -> None:
        self.format.verify(self.stored())

    def n_params(self) -> int:
        return self.format.n_values()

    def describe(self) -> str:
        return f"{self.format.describe()}, {self.runs_as}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_unpacked"] = None
        return state


class _GenericFormat(FormatWeight):
    """The format-recording storage: the spec has a ``format`` entry (``{"kind": ...}``)."""

    def _init_storage(self, shape: tuple[int, ...], format: dict[str, Any]) -> None:
        self._init_format(format_from_spec(shape, format))

    def storage_spec(self) -> dict[str, Any]:
        return {"format": self.format.spec()}

    @classmethod
    def check_spec(cls, spec: Any) -> str | None:
        problem = super().check_spec(spec)
        if problem is not None:
            return problem
        shape = cls.spec_weight_shape(spec)  # type: ignore[attr-defined]
        return check_format(shape, spec["format"])

    @classmethod
    def format_class(cls, spec: dict[str, Any]) -> type[WeightFormat]:
        found = format_class(spec["format"]["kind"])
        assert found is not None
        return found

    @classmethod
    def of(cls, m: nn.Module, fmt: WeightFormat) -> Any:
        """``m`` with its weight stored in ``fmt``."""
        return cls.from_float(m, format=fmt.spec())


class FormatLinear(LinearOp, _GenericFormat):
    """A Linear whose weight is held in the format its spec names."""


class FormatConv2d(Conv2dOp, _GenericFormat):
    """A Conv2d whose weight is held in the format its spec names."""


class FormatEmbedding(EmbeddingOp, _GenericFormat):
    runs_as = "decoded for the lookup"


compressed_modules(FormatLinear, FormatConv2d, FormatEmbedding)


#: float layer type -> the format layer for it
FORMAT_LAYERS: dict[type[nn.Module], type[FormatLinear | FormatConv2d | FormatEmbedding]] = {
    nn.Linear: FormatLinear,
    nn.Conv2d: FormatConv2d,
    nn.Embedding: FormatEmbedding,
}


def weight_shape(m: nn.Module) -> tuple[int, ...]:
    """The weight shape of a float Linear, Conv2d or Embedding."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{type(m).__name__} has no weight")
    return tuple(w.shape)


def format_layer(m: nn.Module, fmt: WeightFormat) -> FormatWeight:
    """``m`` (a float Linear, Conv2d or Embedding) with its weight stored in ``fmt``."""
    layer: FormatWeight = FORMAT_LAYERS[type(m)].of(m, fmt)
    return layer
