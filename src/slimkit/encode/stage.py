"""The ``encode`` stage: store a compressed layer's integer stream Huffman-coded.

``HuffmanCoded`` wraps a layer that holds integer codes (k-means indices, quantized weight
codes) and stores those codes as a canonical Huffman stream (see :mod:`slimkit.encode.huffman`)
instead: one symbol per weight, so frequent codes take fewer bits than the fixed width. The
wrapped layer keeps its other tensors (codebook, scales, bias) as they are; its code buffer is
not saved (it is rebuilt from the stream). Decoding happens once, on the first forward after
the stream changes (after loading), then the wrapped layer computes as before.

Which buffer holds the codes, and how it maps to one byte per weight, is a :class:`Codec` per
layer type (:data:`CODECS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.compressed import CompressedModule, compressed_module, module_class
from slimkit.config import StageConfig
from slimkit.encode import huffman
from slimkit.pipeline import Context
from slimkit.quant import packing
from slimkit.quant.kmeans import KMeansConv2d, KMeansLinear, KMeansWeight
from slimkit.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantWeight
from slimkit.registry import register
from slimkit.select import swap_modules


@dataclasses.dataclass(frozen=True)
class Codec:
    """Where a layer type keeps its codes and how they become one uint8 symbol per weight."""

    buffer: str
    to_symbols: Callable[[Any], torch.Tensor]  # layer -> (n,) uint8
    restore: Callable[[Any, torch.Tensor], None]  # (layer, symbols) -> buffer filled


def _numel(layer: Any) -> int:
    return int(torch.Size(layer.weight_shape).numel())


def _kmeans_symbols(layer: KMeansWeight) -> torch.Tensor:
    return packing.unpack(layer.indices, layer.bits, _numel(layer)).to(torch.uint8)


def _kmeans_restore(layer: KMeansWeight, symbols: torch.Tensor) -> None:
    layer.indices.copy_(packing.pack(symbols, layer.bits))


def _quant_symbols(layer: QuantWeight) -> torch.Tensor:
    if layer.bits == 8:  # int8 codes, reinterpreted byte for byte
        return layer.qweight.reshape(-1).view(torch.uint8).clone()
    return packing.unpack(layer.qweight, layer.bits, _numel(layer)).to(torch.uint8)


def _quant_restore(layer: QuantWeight, symbols: torch.Tensor) -> None:
    if layer.bits == 8:
        layer.qweight.copy_(symbols.view(torch.int8).reshape(layer.qweight.shape))
    else:
        layer.qweight.copy_(packing.pack(symbols, layer.bits))


_KMEANS = Codec("indices", _kmeans_symbols, _kmeans_restore)
_QUANT = Codec("qweight", _quant_symbols, _quant_restore)
CODECS: dict[type[nn.Module], Codec] = {
    KMeansLinear: _KMEANS,
    KMeansConv2d: _KMEANS,
    QuantLinear: _QUANT,
    QuantConv2d: _QUANT,
    QuantEmbedding: _QUANT,
}


@compressed_module
class HuffmanCoded(CompressedModule):
    """A layer with integer codes, its codes stored as a Huffman stream."""

    code_lengths: torch.Tensor
    code_bits: torch.Tensor
    code_starts: torch.Tensor

    def __init__(
        self, inner_type: str, inner_spec: dict[str, Any], n: int, n_bytes: int, n_chunks: int
    ) -> None:
        super().__init__()
        cls = module_class(inner_type)
        if cls is None or cls not in CODECS:
            raise ValueError(f"no Huffman codec for layer type {inner_type!r}")
        self.inner = cls.from_spec(inner_spec)
        self.codec = CODECS[cls]
        # the codes are rebuilt from the stream, so the wrapped layer does not save them
        self.inner._non_persistent_buffers_set.add(self.codec.buffer)
        self.n = n
        self.register_buffer("code_lengths", torch.zeros(256, dtype=torch.uint8))
        self.register_buffer("code_bits", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("code_starts", torch.zeros(n_chunks, dtype=torch.int64))
        self._decoded: int | None = None  # code_bits._version of the decoded stream

    @classmethod
    def wrap(cls, layer: CompressedModule) -> HuffmanCoded:
        codec = CODECS[type(layer)]
        coded = huffman.encode(codec.to_symbols(layer))
        out = cls(
            type(layer).__name__,
            layer.spec(),
            coded.n,
            coded.bits.numel(),
            coded.starts.numel(),
        )
        out.inner.load_state_dict(layer.state_dict(), strict=False)
        out.code_lengths.copy_(coded.lengths)
        out.code_bits.copy_(coded.bits)
        out.code_starts.copy_(coded.starts)
        codec.restore(out.inner, huffman.decode(out.coded()))
        out._decoded = out.code_bits._version
        return out

    def coded(self) -> huffman.Coded:
        return huffman.Coded(self.code_lengths, self.code_bits, self.code_starts, self.n)

    def _restore(self) -> None:
        if self._decoded != self.code_bits._version:
            self.codec.restore(self.inner, huffman.decode(self.coded()))
            self._decoded = self.code_bits._version

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._restore()
        return self.inner(*args, **kwargs)

    def spec(self) -> dict[str, Any]:
        return {
            "inner_type": type(self.inner).__name__,
            "inner_spec": self.inner.spec(),
            "n": self.n,
            "n_bytes": self.code_bits.numel(),
            "n_chunks": self.code_starts.numel(),
        }

    def n_params(self) -> int:
        return 0  # the wrapped layer counts the weights it represents

    def bits_per_weight(self) -> float:
        return 8.0 * self.coded().nbytes() / max(self.n, 1)

    def describe(self) -> str:
        return f"codes Huffman-coded, {self.bits_per_weight():.2f} bits per weight"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decoded"] = None
        return state


@dataclasses.dataclass(frozen=True)
class HuffmanConfig(StageConfig):
    """Huffman-code the integer codes of k-means and quantized layers."""

    kind = "encode"
    method = "huffman"
    acts_on_compressed = True


@register(HuffmanConfig, types=tuple(CODECS))
def apply_huffman(model: nn.Module, config: HuffmanConfig, ctx: Context) -> nn.Module:
    def make(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, CompressedModule)
        return HuffmanCoded.wrap(module)

    swap_modules(model, ctx.names, make)
    return model
