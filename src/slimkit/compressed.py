"""Compressed modules: store the compressed form, run from it, rebuild from a spec.

Every compressed module subclasses ``CompressedModule`` and registers itself with
``@compressed_module``. Saving records ``type(m).__name__`` and ``m.spec()`` for each one;
loading calls ``from_spec(spec)`` to get an empty module whose buffers have the right shapes,
then fills them from ``model.safetensors``. Standard torch layers whose shape a technique
changed are rebuilt the same way through ``standard_spec`` / ``standard_from_spec``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.spec_rules import Rule, check_spec

M = TypeVar("M", bound="type[CompressedModule]")
Fixup = Callable[[nn.Module], None]
FX = TypeVar("FX", bound=Fixup)

_MODULES: dict[str, type[CompressedModule]] = {}
_AFTER_REPLAY: list[Fixup] = []


@dataclasses.dataclass(frozen=True)
class Stream:
    """An integer stream of a stored tensor, as uint8 symbols (one per weight, index or
    mask byte). ``bits``: the symbols' range is ``0 .. 2**bits - 1``; ``bitmask``: the
    stream is the packed keep-mask of ``n_weights`` weights (a coder may code its gaps)."""

    name: str
    symbols: torch.Tensor  # (n,) uint8
    bits: int = 8
    bitmask: bool = False
    n_weights: int = 0


@dataclasses.dataclass(frozen=True)
class StreamKind:
    """What a layer's integer stream is, without its symbols (see ``Stream``)."""

    name: str
    bits: int = 8
    bitmask: bool = False
    n_weights: int = 0

    def of(self, symbols: torch.Tensor) -> Stream:
        return Stream(self.name, symbols, self.bits, self.bitmask, self.n_weights)


class CompressedModule(nn.Module):
    """Base of modules that hold a compressed form of a layer."""

    #: True when the layer only simulates its compression (fake quant, a mask over dense
    #: weights): it is then never counted as smaller or faster.
    simulated: ClassVar[bool] = False
    #: True when the layer's children are plain float layers that training stages (finetune,
    #: distill) may update in place without changing the stored form (factorized and
    #: depthwise-separable layers); False freezes the layer and everything under it.
    trains_children: ClassVar[bool] = False
    #: True when the layer holds integer streams (``streams()`` / ``set_streams()``) that
    #: an entropy coder may store instead (a subclass that stores more turns it off)
    has_streams: ClassVar[bool] = False

    def spec(self) -> dict[str, Any]:
        """JSON-able constructor arguments: enough for ``from_spec`` to rebuild the shapes."""
        raise NotImplementedError

    #: rules for spec keys whose meaning is this layer's own (see ``slimkit.spec_rules``)
    spec_rules: ClassVar[dict[str, Rule]] = {}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CompressedModule:
        return cls(**spec)

    @classmethod
    def check_spec(cls, spec: Any) -> str | None:
        """What is wrong with ``spec`` read from an artifact (types, ranges, arithmetic
        between keys), or None; checked before ``from_spec`` builds anything."""
        return check_spec(spec, cls, cls.spec_rules)

    @classmethod
    def stream_count(cls, spec: dict[str, Any]) -> int:
        """How many integer streams a layer of this (checked) spec holds."""
        return 0

    def stream_kinds(self) -> list[StreamKind]:
        """What ``streams`` returns, without computing the symbols."""
        raise NotImplementedError(f"{type(self).__name__} holds no integer streams")

    def streams(self) -> list[Stream]:
        """The integer streams an entropy coder may store instead (``has_streams``)."""
        raise NotImplementedError(f"{type(self).__name__} holds no integer streams")

    def set_streams(self, symbols: list[torch.Tensor]) -> None:
        """Store the tensors the stream ``symbols`` stand for (inverse of ``streams``)."""
        raise NotImplementedError(f"{type(self).__name__} holds no integer streams")

    def verify(self) -> None:
        """Raise ValueError when the loaded tensors contradict each other (a mask's count
        against the stored values, a coded stream against its sizes); called once by the
        loader after filling them, so a corrupt artifact fails at load, not at a forward."""

    def n_params(self) -> int:
        """Weight values this layer represents (nonzeros only, for sparse storage), not
        counting its ``nn.Parameter``s (a bias), which ``count_params`` adds."""
        raise NotImplementedError

    def describe(self) -> str:
        """One short line: the storage format and how it executes."""
        return type(self).__name__

    def dense_weight(self) -> torch.Tensor:
        """The weight this layer computes with, as a dense float tensor."""
        raise NotImplementedError

    def kernel_weight(self) -> torch.Tensor:
        """The weight the kernel runs with: ``dense_weight()`` unless the storage computes
        in another dtype on this CPU (a bf16 weight)."""
        return self.dense_weight()

    def deployed(self) -> nn.Module:
        """The layer an exporter writes in place of this one (a wrapper's restored inner
        layer); this layer itself by default."""
        return self


class ComposedModule(CompressedModule):
    """A compressed layer made of standard float layers (factorized, depthwise-separable):
    ``count_params`` counts its children's parameters module by module, so ``n_params``
    adds nothing, and training stages update the children in place."""

    trains_children: ClassVar[bool] = True

    def n_params(self) -> int:
        return 0  # the children's parameters are counted as theirs


def compressed_module(cls: M) -> M:
    """Class decorator: make ``cls`` rebuildable from an artifact by its name."""
    _MODULES[cls.__name__] = cls
    return cls


def compressed_modules(*classes: type[CompressedModule]) -> None:
    """``@compressed_module`` for several classes at once."""
    for cls in classes:
        compressed_module(cls)


def module_class(name: str) -> type[CompressedModule] | None:
    return _MODULES.get(name)


def stream_layers() -> tuple[type[CompressedModule], ...]:
    """The registered layer classes whose integer streams can be entropy-coded."""
    return tuple(cls for cls in _MODULES.values() if cls.has_streams)


def after_replay(fn: FX) -> FX:
    """Decorator: run ``fn(model)`` on every loaded model once its recorded modules are
    swapped in, to set attributes a technique derives from the rebuilt layers' shapes (an
    attention module's head count). ``fn`` must leave any other model unchanged."""
    if fn not in _AFTER_REPLAY:
        _AFTER_REPLAY.append(fn)
    return fn


def run_after_replay(model: nn.Module) -> None:
    for fn in _AFTER_REPLAY:
        fn(model)


# -- standard torch layers whose shapes a technique may change -------------------------
_STANDARD: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "Conv2d": (
        nn.Conv2d,
        ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
    ),
    "Embedding": (nn.Embedding, ("num_embeddings", "embedding_dim", "padding_idx")),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine")),
}


def standard_spec(module: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments of a standard layer, or None for any other module."""
    entry = _STANDARD.get(type(module).__name__)
    if entry is None or type(module) is not entry[0]:
        return None
    spec: dict[str, Any] = {k: _jsonable(getattr(module, k)) for k in entry[1]}
    if isinstance(module, nn.Linear | nn.Conv2d):
        spec["bias"] = module.bias is not None
    return spec


def check_standard_spec(type_name: str, spec: Any) -> str | None:
    """What is wrong with ``spec`` as a standard layer's spec read from an artifact, or None:
    exactly the keys ``standard_spec`` writes, each within its rule."""
    cls, fields = _STANDARD[type_name]
    keys = set(fields) | ({"bias"} if cls in (nn.Linear, nn.Conv2d) else set())
    if not isinstance(spec, dict):
        return "the spec must be a mapping"
    if set(spec) != keys:
        return f"keys {sorted(spec)}, expected {sorted(keys)}"
    return check_spec(spec, cls)


def standard_from_spec(type_name: str, spec: dict[str, Any]) -> nn.Module:
    cls, _ = _STANDARD[type_name]
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return cls(**args)


def is_standard(type_name: str) -> bool:
    return type_name in _STANDARD


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def conv_args(m: nn.Conv2d) -> dict[str, Any]:
    """Shape arguments of a Conv2d, JSON-able (for building a compressed twin).

    Raises ValueError for what compressed convolutions do not support (string padding,
    a padding mode other than zeros).
    """
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise ValueError(f"padding={m.padding!r}, padding_mode={m.padding_mode!r}")
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": list(m.padding),  # type: ignore[arg-type]
        "dilation": list(m.dilation),
        "groups": m.groups,
    }


def is_simulated(model: nn.Module) -> bool:
    return any(isinstance(m, CompressedModule) and m.simulated for m in model.modules())


def count_params(model: nn.Module) -> int:
    """Parameters of the model, counting compressed layers by the weights they represent."""
    total = 0
    for m in model.modules():
        if isinstance(m, CompressedModule):
            total += m.n_params()
        total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def _pair(v: list[int] | tuple[int, int]) -> tuple[int, int]:
    return (int(v[0]), int(v[1]))


class ConvGeometry(nn.Module):
    """The shape arguments of a 2-D convolution, shared by the compressed convolutions.

    The rest of a layer's arguments (``**layer``) go to its ``_init_layer``, called once the
    geometry is stored (groups 1 until ``_init_layer`` says otherwise)."""

    if TYPE_CHECKING:
        _init_layer: Callable[..., None]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int] | tuple[int, int],
        stride: list[int] | tuple[int, int] = (1, 1),
        padding: list[int] | tuple[int, int] = (0, 0),
        dilation: list[int] | tuple[int, int] = (1, 1),
        **layer: Any,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, 1
        self.kernel_size: tuple[int, int] = _pair(kernel_size)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.dilation: tuple[int, int] = _pair(dilation)
        self._init_layer(**layer)

    @property
    def conv_weight_shape(self) -> tuple[int, int, int, int]:
        """(out, in / groups, kh, kw)."""
        kh, kw = self.kernel_size
        return (self.out_channels, self.in_channels // self.groups, kh, kw)

    def geometry_spec(self, with_groups: bool = True) -> dict[str, Any]:
        """The stored shape arguments, JSON-able; without ``groups`` for layers that only
        stand for standard (groups 1) convolutions."""
        out: dict[str, Any] = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
        }
        if with_groups:
            out["groups"] = self.groups
        return out

    def conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


def copy_bias(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` a frozen copy of ``src``'s bias (when it has one)."""
    bias = getattr(src, "bias", None)
    if bias is not None:
        dst.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
