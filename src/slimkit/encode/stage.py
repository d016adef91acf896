"""The ``encode`` stage: store a compressed layer's integer streams Huffman-coded.

``HuffmanCoded`` wraps a layer that holds integer streams (k-means indices, quantized weight
codes, the bitmask of a sparse layer) and stores each stream as a canonical Huffman code (see
:mod:`slimkit.encode.huffman`) instead: frequent symbols take fewer bits than the fixed width
(Deep Compression's third stage). Indices and codes are coded one symbol per weight; a
bitmask is coded one symbol per mask byte, which at low density costs about the entropy of
the kept positions. The wrapped layer keeps its other tensors (codebook, values, scales, bias)
as they are; the buffers of its streams are not saved, they are rebuilt from the code.

Everything coded for one layer is one uint8 ``payload`` tensor: per stream, the code lengths
of the symbols ``0..n_symbols - 1``, the code bits, then the chunk offsets (int64 bytes); the
spec records each stream's sizes. Decoding happens once, on the first forward after the
payload changes (after loading); the wrapped layer then computes as before.

Which buffers hold the streams, and how they map to uint8 symbols, is a :class:`Codec` per
layer type (:data:`CODECS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.compressed import CompressedModule, compressed_module, module_class
from slimkit.config import StageConfig
from slimkit.encode import huffman
from slimkit.pipeline import Context
from slimkit.prune.sparse import SparseConv2d, SparseLinear
from slimkit.quant import packing
from slimkit.quant.kmeans import (
    KMeansConv2d,
    KMeansLinear,
    KMeansWeight,
    SparseKMeansConv2d,
    SparseKMeansLinear,
    SparseKMeansWeight,
)
from slimkit.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantWeight
from slimkit.registry import register
from slimkit.select import swap_modules

Streams = list[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Codec:
    """Where a layer type keeps its integer streams and how they become uint8 symbols."""

    buffers: tuple[str, ...]
    to_symbols: Callable[[Any], Streams]  # layer -> one (n_i,) uint8 tensor per buffer
    restore: Callable[[Any, Streams], None]  # (layer, symbols) -> buffers filled


def _numel(layer: Any) -> int:
    return int(torch.Size(layer.weight_shape).numel())


def _kmeans_symbols(layer: KMeansWeight) -> Streams:
    return [layer.index_tensor().to(torch.uint8)]


def _kmeans_restore(layer: KMeansWeight, streams: Streams) -> None:
    layer.indices.copy_(packing.pack(streams[0], layer.bits))


def _sparse_kmeans_symbols(layer: SparseKMeansWeight) -> Streams:
    return [layer.index_tensor().to(torch.uint8), layer.mask.clone()]


def _sparse_kmeans_restore(layer: SparseKMeansWeight, streams: Streams) -> None:
    layer.indices.copy_(packing.pack(streams[0], layer.bits))
    layer.mask.copy_(streams[1])


def _sparse_symbols(layer: SparseLinear | SparseConv2d) -> Streams:
    return [layer.mask.clone()]


def _sparse_restore(layer: SparseLinear | SparseConv2d, streams: Streams) -> None:
    layer.mask.copy_(streams[0])
    layer.dense = None


def _quant_symbols(layer: QuantWeight) -> Streams:
    if layer.bits == 8:  # int8 codes, reinterpreted byte for byte
        return [layer.qweight.reshape(-1).view(torch.uint8).clone()]
    return [packing.unpack(layer.qweight, layer.bits, _numel(layer)).to(torch.uint8)]


def _quant_restore(layer: QuantWeight, streams: Streams) -> None:
    if layer.bits == 8:
        layer.qweight.copy_(streams[0].view(torch.int8).reshape(layer.qweight.shape))
    else:
        layer.qweight.copy_(packing.pack(streams[0], layer.bits))


_KMEANS = Codec(("indices",), _kmeans_symbols, _kmeans_restore)
_SPARSE_KMEANS = Codec(("indices", "mask"), _sparse_kmeans_symbols, _sparse_kmeans_restore)
_SPARSE = Codec(("mask",), _sparse_symbols, _sparse_restore)
_QUANT = Codec(("qweight",), _quant_symbols, _quant_restore)
CODECS: dict[type[nn.Module], Codec] = {
    KMeansLinear: _KMEANS,
    KMeansConv2d: _KMEANS,
    SparseKMeansLinear: _SPARSE_KMEANS,
    SparseKMeansConv2d: _SPARSE_KMEANS,
    SparseLinear: _SPARSE,
    SparseConv2d: _SPARSE,
    QuantLinear: _QUANT,
    QuantConv2d: _QUANT,
    QuantEmbedding: _QUANT,
}


# -- payload layout -----------------------------------------------------------------------
def stream_layout(coded: huffman.Coded) -> dict[str, int]:
    """The sizes that locate one coded stream in a payload."""
    present = torch.nonzero(coded.lengths).reshape(-1)
    n_symbols = int(present.max()) + 1 if present.numel() else 0
    return {
        "n": coded.n,
        "n_symbols": n_symbols,
        "n_bytes": coded.bits.numel(),
        "n_chunks": coded.starts.numel(),
    }


def payload_bytes(layout: dict[str, int]) -> int:
    return layout["n_symbols"] + layout["n_bytes"] + 8 * layout["n_chunks"]


def pack_payload(streams: list[huffman.Coded]) -> torch.Tensor:
    """The uint8 payload of ``streams``: per stream, lengths, bits, chunk offsets."""
    parts = []
    for coded in streams:
        layout = stream_layout(coded)
        parts.append(coded.lengths[: layout["n_symbols"]])
        parts.append(coded.bits)
        offsets = coded.starts.numpy().astype("<i8").view(np.uint8)  # little-endian int64
        parts.append(torch.from_numpy(offsets.copy()))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_payload(payload: torch.Tensor, layouts: list[dict[str, int]]) -> list[huffman.Coded]:
    """The coded streams of ``payload`` (the inverse of :func:`pack_payload`)."""
    if payload.numel() != sum(payload_bytes(layout) for layout in layouts):
        raise ValueError("the payload does not match its layout")
    out, at = [], 0
    for layout in layouts:
        lengths = torch.zeros(256, dtype=torch.uint8)
        k = layout["n_symbols"]
        lengths[:k] = payload[at : at + k]
        at += k
        bits = payload[at : at + layout["n_bytes"]].clone()
        at += layout["n_bytes"]
        size = 8 * layout["n_chunks"]
        raw = payload[at : at + size].numpy().tobytes()
        starts = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
        at += size
        out.append(huffman.Coded(lengths, bits, starts, layout["n"]))
    return out


@compressed_module
class HuffmanCoded(CompressedModule):
    """A layer with integer streams, the streams stored Huffman-coded in one payload."""

    payload: torch.Tensor

    def __init__(
        self, inner_type: str, inner_spec: dict[str, Any], streams: list[dict[str, int]]
    ) -> None:
        super().__init__()
        cls = module_class(inner_type)
        if cls is None or cls not in CODECS:
            raise ValueError(f"no Huffman codec for layer type {inner_type!r}")
        self.inner = cls.from_spec(inner_spec)
        self.codec = CODECS[cls]
        if len(streams) != len(self.codec.buffers):
            raise ValueError(
                f"{inner_type} has {len(self.codec.buffers)} streams, got {len(streams)}"
            )
        # the streams are rebuilt from the payload, so the wrapped layer does not save them
        self.inner._non_persistent_buffers_set.update(self.codec.buffers)
        self.streams = [dict(layout) for layout in streams]
        size = sum(payload_bytes(layout) for layout in self.streams)
        self.register_buffer("payload", torch.zeros(size, dtype=torch.uint8))
        self._decoded: int | None = None  # payload._version of the decoded payload

    @classmethod
    def wrap(cls, layer: CompressedModule) -> HuffmanCoded:
        coded = [huffman.encode(s) for s in CODECS[type(layer)].to_symbols(layer)]
        out = cls(type(layer).__name__, layer.spec(), [stream_layout(c) for c in coded])
        out.inner.load_state_dict(layer.state_dict(), strict=False)
        out.payload.copy_(pack_payload(coded))
        out._restore()
        return out

    def _restore(self) -> None:
        if self._decoded != self.payload._version:
            coded = unpack_payload(self.payload, self.streams)
            self.codec.restore(self.inner, [huffman.decode(c) for c in coded])
            self._decoded = self.payload._version

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._restore()
        return self.inner(*args, **kwargs)

    def spec(self) -> dict[str, Any]:
        return {
            "inner_type": type(self.inner).__name__,
            "inner_spec": self.inner.spec(),
            "streams": self.streams,
        }

    def n_params(self) -> int:
        return 0  # the wrapped layer counts the weights it represents

    def bits_per_symbol(self) -> list[float]:
        """Mean coded bits per symbol of each stream, lengths and offsets included."""
        return [8.0 * payload_bytes(s) / max(s["n"], 1) for s in self.streams]

    def describe(self) -> str:
        rates = ", ".join(
            f"{name} {rate:.2f} bits/symbol"
            for name, rate in zip(self.codec.buffers, self.bits_per_symbol(), strict=True)
        )
        return f"Huffman-coded {rates}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decoded"] = None
        return state


@dataclasses.dataclass(frozen=True)
class HuffmanConfig(StageConfig):
    """Huffman-code the integer streams of k-means, quantized and sparse layers."""

    kind = "encode"
    method = "huffman"


@register(HuffmanConfig, types=tuple(CODECS))
def apply_huffman(model: nn.Module, config: HuffmanConfig, ctx: Context) -> nn.Module:
    def make(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, CompressedModule)
        return HuffmanCoded.wrap(module)

    swap_modules(model, ctx.names, make)
    return model
