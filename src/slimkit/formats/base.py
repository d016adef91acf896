"""What every weight format is: one idea of storing a weight, as a small immutable value.

A format knows the shape of the weight it stores and its own options (bits, granularity,
group size, ...). It does not hold tensors: the layer that uses it registers the tensors
``layout()`` names as its buffers (so an artifact's tensor names are the format's), and
passes them back in a mapping to every other method. This keeps a format pure: ``encode``
turns a float weight into tensors, ``decode`` turns tensors back into the float weight, and
``streams`` lists the integer streams an entropy coder may code instead.

A format class names its ``kind`` (and its ``packed`` tensors and ``stream_count``) in its
class statement, which registers it: ``class NF4Format(WeightFormat, kind="nf4", ...)``.
A layer's spec records ``{"kind": ..., **options}``; :func:`format_from_spec` rebuilds the
format from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from slimkit.compressed import Stream, StreamKind
from slimkit.config import Granularity
from slimkit.spec_rules import Rule, check_spec

Tensors = Mapping[str, torch.Tensor]
_FORMATS: dict[str, type[WeightFormat]] = {}


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a recipe asks for integer weights: bits, granularity, group size, symmetry.
    The same names in a recipe's options, a format's spec and the code."""

    bits: int = 8
    granularity: Granularity = Granularity.PER_CHANNEL
    group_size: int | None = None
    symmetric: bool = True

    @property
    def per_channel(self) -> bool:
        """Not one scale for the whole tensor (per channel, or per group within one)."""
        return self.granularity is not Granularity.PER_TENSOR


@dataclasses.dataclass(frozen=True)
class Slot:
    """One stored tensor: its shape, dtype and the value an empty layer holds."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    fill: float = 0.0

    def empty(self) -> torch.Tensor:
        return torch.full(self.shape, self.fill, dtype=self.dtype)


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """Base of the weight formats (see the module docstring). Subclasses are frozen
    dataclasses; their fields follow ``shape``."""

    kind: ClassVar[str]
    #: rules for the spec keys of this format (see ``slimkit.spec_rules``)
    spec_rules: ClassVar[dict[str, Rule]] = {}
    #: the stored tensors ``unpack`` reads (its cache is kept while they do not change)
    packed: ClassVar[tuple[str, ...]] = ()
    #: how many integer streams ``streams`` returns
    stream_count: ClassVar[int] = 0
    shape: tuple[int, ...]

    def __init_subclass__(
        cls,
        kind: str | None = None,
        packed: tuple[str, ...] | None = None,
        stream_count: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if packed is not None:
            cls.packed = packed
        if stream_count is not None:
            cls.stream_count = stream_count
        if kind is not None:
            cls.kind = kind
            _FORMATS[kind] = cls

    def _granularity(self) -> None:
        """Turn a granularity given as text into the enum (ValueError for other text)."""
        value = getattr(self, "granularity", None)
        if value is not None and not isinstance(value, Granularity):
            try:
                object.__setattr__(self, "granularity", Granularity(value))
            except ValueError:
                allowed = ", ".join(g.value for g in Granularity)
                raise ValueError(f"granularity {value!r}; allowed: {allowed}") from None

    # -- storage ---------------------------------------------------------------------------
    def layout(self) -> dict[str, Slot | None]:
        """The tensors this format stores, by name; None for a name that is absent in this
        configuration (an asymmetric zero point of a symmetric format)."""
        raise NotImplementedError

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors for the float weight ``w`` (of ``shape``)."""
        raise NotImplementedError

    def unpack(self, t: Tensors) -> Any:
        """What ``decode`` needs from the packed tensors, worth caching between calls
        while they do not change (unpacked codes); by default nothing."""
        return None

    def decode(self, t: Tensors, unpacked: Any = None) -> torch.Tensor:
        """The float weight (``shape``) the tensors ``t`` stand for; ``unpacked`` is
        ``unpack(t)`` when the caller cached it."""
        raise NotImplementedError

    def stream_kinds(self) -> list[StreamKind]:
        """What ``streams`` returns, without computing the symbols."""
        return []

    def streams(self, t: Tensors) -> list[Stream]:
        """The integer streams of ``t`` an entropy coder may store instead."""
        return []

    def from_streams(self, t: Tensors, symbols: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored tensors that ``streams`` read ``symbols`` from (inverse of it)."""
        if self.stream_count == 0:
            return {}
        raise NotImplementedError

    def verify(self, t: Tensors) -> None:
        """ValueError when loaded tensors contradict each other."""

    def native(self, t: Tensors) -> torch.Tensor | None:
        """A stored tensor the kernel computes with directly, in its own dtype, on this CPU
        (a bf16 weight where the CPU has bf16 instructions); None: decode to fp32."""
        return None

    # -- description ---------------------------------------------------------------------
    def n_values(self) -> int:
        """Weight values the format represents (the kept ones, for a sparse format)."""
        return math.prod(self.shape)

    def options(self) -> dict[str, Any]:
        """The format's own options, JSON-able (its spec without ``kind``)."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {f.name: getattr(self, f.name) for f in fields if f.name != "shape"}

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.options()}

    def describe(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_options(cls, shape: tuple[int, ...], **options: Any) -> WeightFormat:
        return cls(tuple(shape), **options)  # type: ignore[call-arg]

    @classmethod
    def check_options(cls, shape: tuple[int, ...], options: dict[str, Any]) -> str | None:
        """What is wrong with ``options`` read from an artifact for a weight of ``shape``,
        or None (types and ranges first, then the arithmetic of the format)."""
        if "shape" in options:
            return "unknown key 'shape'"
        rules = {**cls.spec_rules, "shape": lambda _: None}
        problem = check_spec({**options, "shape": list(shape)}, cls, rules, cross=False)
        if problem is not None:
            return problem
        try:
            cls.from_options(shape, **options)
        except ValueError as e:
            return str(e)
        return None

    @classmethod
    def from_scheme(cls, shape: tuple[int, ...], scheme: Scheme) -> WeightFormat:
        """The format for a weight of ``shape`` quantized as ``scheme`` says (a recipe's
        bits, granularity, group size, symmetry); ValueError when it cannot hold it."""
        raise ValueError(f"the {cls.kind} format is not made from a quantization scheme")


def format_class(kind: str) -> type[WeightFormat] | None:
    return _FORMATS.get(kind)


def format_kinds() -> list[str]:
    return sorted(_FORMATS)


def format_from_spec(shape: tuple[int, ...], spec: dict[str, Any]) -> WeightFormat:
    """The format a layer spec's ``format`` entry records (checked by ``check_format``)."""
    options = dict(spec)
    cls = format_class(options.pop("kind"))
    assert cls is not None
    return cls.from_options(shape, **options)


def check_format(shape: tuple[int, ...], spec: Any) -> str | None:
    """What is wrong with a ``format`` entry read from an artifact, or None."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        return "format must be a mapping with a string 'kind'"
    options = dict(spec)
    kind = options.pop("kind")
    cls = format_class(kind)
    if cls is None:
        return f"format kind {kind!r} is not one of {', '.join(format_kinds())}"
    problem = cls.check_options(shape, options)
    return None if problem is None else f"format {kind}: {problem}"
