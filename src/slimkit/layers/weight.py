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
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import (
    CompressedModule,
    ConvGeometry,
    StreamKind,
    compressed_module,
    conv_args,
    copy_bias,
)
from slimkit.formats.base import (
    Stream,
    WeightFormat,
    check_format,
    format_class,
    format_from_spec,
)


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

    def unpacked(self) -> Any:
        """``format.unpack`` of the stored tensors, cached while its inputs do not change."""
        t = self.stored()
        key = tuple((id(t[n]), t[n]._version) for n in self.format.packed if n in t)
        if self._unpacked is None or self._unpacked[0] != key:
            self._unpacked = (key, self.format.unpack(t))
        return self._unpacked[1]

    def dense_weight(self) -> torch.Tensor:
        return self.format.decode(self.stored(), self.unpacked())

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
    """The format-recording layers: their spec has a ``format`` entry."""

    @classmethod
    def check_spec(cls, spec: Any) -> str | None:
        problem = super().check_spec(spec)
        if problem is not None:
            return problem
        return check_format(cls.spec_weight_shape(spec), spec["format"])

    @classmethod
    def spec_weight_shape(cls, spec: dict[str, Any]) -> tuple[int, ...]:
        raise NotImplementedError

    @classmethod
    def format_class(cls, spec: dict[str, Any]) -> type[WeightFormat]:
        found = format_class(spec["format"]["kind"])
        assert found is not None
        return found


@compressed_module
class FormatLinear(_GenericFormat):
    def __init__(
        self, in_features: int, out_features: int, format: dict[str, Any], bias: bool = True
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_format(format_from_spec((out_features, in_features), format))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def spec_weight_shape(cls, spec: dict[str, Any]) -> tuple[int, ...]:
        return (spec["out_features"], spec["in_features"])

    @classmethod
    def from_float(cls, m: nn.Linear, fmt: WeightFormat) -> FormatLinear:
        q = cls(m.in_features, m.out_features, fmt.spec(), m.bias is not None)
        copy_bias(m, q)
        q.set_weight(m.weight)
        return q

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "format": self.format.spec(),
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format.kind}"


@compressed_module
class FormatConv2d(_GenericFormat, ConvGeometry):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int] | tuple[int, int],
        format: dict[str, Any],
        stride: list[int] | tuple[int, int] = (1, 1),
        padding: list[int] | tuple[int, int] = (0, 0),
        dilation: list[int] | tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        shape = self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        self._init_format(format_from_spec(shape, format))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def spec_weight_shape(cls, spec: dict[str, Any]) -> tuple[int, ...]:
        kh, kw = spec["kernel_size"]
        groups = spec.get("groups", 1)
        return (spec["out_channels"], spec["in_channels"] // groups, kh, kw)

    @classmethod
    def from_float(cls, m: nn.Conv2d, fmt: WeightFormat) -> FormatConv2d:
        q = cls(**conv_args(m), format=fmt.spec(), bias=m.bias is not None)
        copy_bias(m, q)
        q.set_weight(m.weight)
        return q

    def spec(self) -> dict[str, Any]:
        return {**self.geometry_spec(), "format": self.format.spec(), "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.dense_weight(), self.bias)


@compressed_module
class FormatEmbedding(_GenericFormat):
    runs_as = "decoded for the lookup"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        format: dict[str, Any],
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self._init_format(format_from_spec((num_embeddings, embedding_dim), format))

    @classmethod
    def spec_weight_shape(cls, spec: dict[str, Any]) -> tuple[int, ...]:
        return (spec["num_embeddings"], spec["embedding_dim"])

    @classmethod
    def from_float(cls, m: nn.Embedding, fmt: WeightFormat) -> FormatEmbedding:
        if m.max_norm is not None or m.sparse:
            raise ValueError("max_norm/sparse embeddings are not supported")
        q = cls(m.num_embeddings, m.embedding_dim, fmt.spec(), m.padding_idx)
        q.set_weight(m.weight)
        return q

    def spec(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "format": self.format.spec(),
            "padding_idx": self.padding_idx,
        }

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.dense_weight(), self.padding_idx)


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
    cls = FORMAT_LAYERS[type(m)]
    return cls.from_float(m, fmt)  # type: ignore[arg-type]
