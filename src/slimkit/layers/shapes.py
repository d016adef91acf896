"""The operation side of a compressed layer: what it computes (a Linear, a Conv2d or an
Embedding), separate from how its weight is stored.

A compressed layer class is one of these operations plus a storage class, for example
``class QuantLinear(LinearOp, QuantWeight)``. The operation owns the shape arguments, the bias,
the forward and the shape half of the spec; the storage class owns the weight: its
``_init_storage(shape, **options)`` registers the stored tensors, ``storage_spec()`` gives
the options back, ``dense_weight()`` decodes them. The constructor takes the shape arguments
and then the storage options by keyword, so the spec is ``{**shape_spec, **storage_spec}``
and a layer is rebuilt from it by ``cls(**spec)`` (``spec_rules`` reads the storage options
from ``_init_storage``).

``layer_input`` is the input side: the identity here; a layer that quantizes its
activations overrides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import ConvGeometry, conv_args, copy_bias
from slimkit.errors import ConfigError


class LayerOp(nn.Module):
    """Base of the operation halves (see the module docstring)."""

    bias: nn.Parameter | None

    if TYPE_CHECKING:  # supplied by the storage half (declared here, defined there)
        _init_storage: Callable[..., None]

        def storage_spec(self) -> dict[str, Any]: ...

        def dense_weight(self) -> torch.Tensor: ...

        def kernel_weight(self) -> torch.Tensor: ...

    # the operation half
    def shape_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def spec_weight_shape(cls, spec: dict[str, Any]) -> tuple[int, ...]:
        """The weight shape a (checked) spec of this layer stands for."""
        raise NotImplementedError

    @classmethod
    def float_args(cls, m: nn.Module) -> dict[str, Any]:
        """The shape arguments of the float layer ``m`` (or of another compressed layer of
        the same operation)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {**self.shape_spec(), **self.storage_spec()}

    def extra_repr(self) -> str:
        shape = ", ".join(str(v) for v in self.shape_spec().values())
        options = [
            f"{k}={v['kind'] if isinstance(v, dict) else v}" for k, v in self.storage_spec().items()
        ]
        return ", ".join([shape, *options])

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the operation sees it (activation quantization overrides this)."""
        return x

    def _run(self, op: Any, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        """``op(input, weight, bias, **kw)`` in the kernel weight's dtype, output in x's."""
        w = self.kernel_weight()
        x_in = self.layer_input(x)
        if w.dtype == x_in.dtype:
            return op(x_in, w, self.bias, **kw)  # type: ignore[no-any-return]
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return op(x_in.to(w.dtype), w, bias, **kw).to(x.dtype)  # type: ignore[no-any-return]

    def _init_bias(self, bias: bool, n: int) -> None:
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    @classmethod
    def empty_like(cls, m: nn.Module, **options: Any) -> Any:
        """A layer of ``m``'s shape and bias, its stored weight still to be set."""
        q = cls(**cls.float_args(m), **options)
        copy_bias(m, q)
        return q


class LinearOp(LayerOp):
    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, **storage: Any
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), **storage)
        self._init_bias(bias, out_features)

    def shape_spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def spec_weight_shape(cls, spec: dict[str, Any]) -> tuple[int, ...]:
        return (spec["out_features"], spec["in_features"])

    @classmethod
    def float_args(cls, m: nn.Module) -> dict[str, Any]:
        return {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": getattr(m, "bias", None) is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(F.linear, x)


class Conv2dOp(LayerOp, ConvGeometry):
    def _init_layer(self, groups: int = 1, bias: bool = True, **storage: Any) -> None:
        self.groups = groups
        self._init_storage(self.conv_weight_shape, **storage)
        self._init_bias(bias, self.out_channels)

    def shape_spec(self) -> dict[str, Any]:
        return {**self.geometry_spec(), "bias": self.bias is not None}

    @classmethod
    def spec_weight_shape(cls, spec: dict[str, Any]) -> tuple[int, ...]:
        kh, kw = spec["kernel_size"]
        groups = spec.get("groups", 1)
        return (spec["out_channels"], spec["in_channels"] // groups, kh, kw)

    @classmethod
    def float_args(cls, m: nn.Module) -> dict[str, Any]:
        if isinstance(m, ConvGeometry):
            shape = m.geometry_spec()
        else:
            assert isinstance(m, nn.Conv2d)
            shape = conv_args(m)
        return {**shape, "bias": getattr(m, "bias", None) is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zero padding stays exact when the input is quantized: the code of 0.0 is 0.0
        return self._run(self.conv, x)


class EmbeddingOp(LayerOp):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        **storage: Any,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self._init_storage((num_embeddings, embedding_dim), **storage)
        self.bias = None

    def shape_spec(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }

    @classmethod
    def spec_weight_shape(cls, spec: dict[str, Any]) -> tuple[int, ...]:
        return (spec["num_embeddings"], spec["embedding_dim"])

    @classmethod
    def float_args(cls, m: nn.Module) -> dict[str, Any]:
        if getattr(m, "max_norm", None) is not None or getattr(m, "sparse", False):
            raise ValueError("max_norm/sparse embeddings are not supported")
        return {
            "num_embeddings": m.num_embeddings,
            "embedding_dim": m.embedding_dim,
            "padding_idx": m.padding_idx,
        }

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.kernel_weight(), self.padding_idx).float()


#: float layer type -> its operation half
OPS: dict[type[nn.Module], type[LayerOp]] = {
    nn.Linear: LinearOp,
    nn.Conv2d: Conv2dOp,
    nn.Embedding: EmbeddingOp,
}


def check_twins(
    model: nn.Module,
    names: Iterable[str],
    twins: Mapping[type[nn.Module], type[LayerOp]],
    method: str,
    done: str,
    keep: tuple[type[nn.Module], ...] = (),
) -> None:
    """ConfigError naming the first selected layer that has no twin in ``twins`` (a layer
    of a ``keep`` type passes) or whose shape its twin cannot hold; ``done`` says what
    ``method`` does ("quantized", "pruned")."""
    for name in names:
        module = model.get_submodule(name)  # a shared module is checked under each name
        if isinstance(module, keep):
            continue
        twin = twins.get(type(module))
        if twin is None:
            raise ConfigError(f"layer {name!r} ({type(module).__name__}) cannot be {done}")
        try:
            twin.float_args(module)
        except ValueError as e:
            raise ConfigError(f"layer {name!r} cannot be {done} by {method}: {e}") from None
