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

Which tensors hold the streams, and how they map to uint8 symbols, each layer says itself
(``streams()`` / ``set_streams()``, from its weight format); layers with ``has_streams``
can be coded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from slimkit.compressed import CompressedModule, compressed_module, module_class, stream_layers
from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.encode import huffman
from slimkit.encode.positions import ESCAPE, ESCAPES, gaps_from_mask, mask_from_gaps
from slimkit.registry import register
from slimkit.select import swap_modules

Streams = list[torch.Tensor]


def _symbols(layer: CompressedModule) -> Streams:
    return [s.symbols for s in layer.streams()]


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


FLOATS = ("float32", "float16")


def _best_gaps(mask: torch.Tensor, numel: int) -> tuple[int, huffman.Coded]:
    """The escape whose gap code of the packed bitmask ``mask`` takes the fewest payload
    bytes, code-length table included, and that code."""
    best: tuple[int, huffman.Coded] | None = None
    for escape in ESCAPES:
        coded = huffman.encode(gaps_from_mask(mask, numel, escape))
        if best is None or payload_bytes(stream_layout(coded)) < payload_bytes(
            stream_layout(best[1])
        ):
            best = (escape, coded)
    assert best is not None
    return best


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat uint8 tensor (little-endian, as torch stores them)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


@compressed_module
class HuffmanCoded(CompressedModule):
    """A layer with integer streams, the streams stored Huffman-coded in one payload.

    With ``floats`` set, the payload also holds every other tensor of the wrapped layer
    (codebook, values, scales, bias) raw, floating ones as ``floats`` (``float16`` rounds
    them; ``float32`` keeps them exact), so the layer is one tensor in the artifact. Without
    it (older artifacts) the wrapped layer saves those tensors itself. ``positions`` says how
    a bitmask stream is coded: ``gaps`` (:mod:`slimkit.encode.positions`) or ``bytes``."""

    payload: torch.Tensor

    def __init__(
        self,
        inner_type: str,
        inner_spec: dict[str, Any],
        streams: list[dict[str, int]],
        positions: str = "bytes",
        floats: str | None = None,
        escape: int = ESCAPE,
    ) -> None:
        super().__init__()
        cls = module_class(inner_type)
        if cls is None or not cls.has_streams:
            raise ValueError(f"no Huffman codec for layer type {inner_type!r}")
        if positions not in ("gaps", "bytes"):
            raise ValueError(f"positions {positions!r}; allowed: gaps, bytes")
        if floats is not None and floats not in FLOATS:
            raise ValueError(f"floats {floats!r}; allowed: {', '.join(FLOATS)}")
        self.inner = cls.from_spec(inner_spec)
        held = self.inner.stream_kinds()
        self.stream_names = [s.name for s in held]
        self.mask = next((i for i, s in enumerate(held) if s.bitmask), None)
        self.n_weights = max((s.n_weights for s in held), default=0)
        self.symbol_bits = [s.bits for s in held]
        if len(streams) != len(held):
            raise ValueError(f"{inner_type} has {len(held)} streams, got {len(streams)}")
        self.positions, self.floats, self.escape = positions, floats, escape
        # the streams are rebuilt from the payload, so the wrapped layer does not save them
        self.inner._non_persistent_buffers_set.update(self.stream_names)
        self.held_params = 0
        self.raw_names = self._take_tensors() if floats is not None else []
        self.layouts = [dict(layout) for layout in streams]
        size = sum(payload_bytes(layout) for layout in self.layouts)
        size += sum(self._stored(self._tensor(n)).numel() for n in self.raw_names)
        self.register_buffer("payload", torch.zeros(size, dtype=torch.uint8))
        self._decoded: int | None = None  # payload._version of the decoded payload

    # -- the wrapped layer's other tensors, held in the payload ---------------------------
    def _take_tensors(self) -> list[str]:
        """Names of the wrapped layer's saved tensors other than its streams, made
        non-persistent buffers (its parameters too: a coded layer does not train)."""
        names = list(self.inner.state_dict())
        self.held_params = 0  # elements of the wrapped layer's parameters held as buffers
        for name in names:
            prefix, _, attr = name.rpartition(".")
            owner = self.inner.get_submodule(prefix)
            param = owner._parameters.pop(attr, None)
            if param is not None:
                owner.register_buffer(attr, param.detach(), persistent=False)
                self.held_params += param.numel()
            else:
                owner._non_persistent_buffers_set.add(attr)
        return names

    def _tensor(self, name: str) -> torch.Tensor:
        prefix, _, attr = name.rpartition(".")
        t = getattr(self.inner.get_submodule(prefix), attr)
        assert isinstance(t, torch.Tensor)
        return t

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the payload stores it: floating tensors as ``floats``, others as is."""
        if t.is_floating_point() and self.floats is not None:
            t = t.to(_dtype(self.floats))
        return _raw(t)

    # -- building and decoding -------------------------------------------------------------
    @classmethod
    def wrap(
        cls, layer: CompressedModule, positions: str = "gaps", floats: str | None = "float32"
    ) -> HuffmanCoded:
        held = layer.streams()
        symbols = [s.symbols for s in held]
        mask = next((i for i, s in enumerate(held) if s.bitmask), None)
        escape = ESCAPE
        coded = [huffman.encode(s) for s in symbols]
        if mask is not None and positions == "gaps":
            escape, coded[mask] = _best_gaps(symbols[mask], held[mask].n_weights)
        layouts = [stream_layout(c) for c in coded]
        out = cls(type(layer).__name__, layer.spec(), layouts, positions, floats, escape)
        state = layer.state_dict()
        out.inner.load_state_dict(state, strict=False)
        raw = [out._stored(state[name]) for name in out.raw_names]
        out.payload.copy_(torch.cat([pack_payload(coded), *raw]))
        out._restore()
        return out

    @classmethod
    def check_spec(cls, spec: Any) -> str | None:
        problem = super().check_spec(spec)
        if problem is not None:
            return problem
        inner = module_class(spec["inner_type"])
        if inner is None or not inner.has_streams:
            return f"inner_type={spec['inner_type']!r} is not a layer with integer streams"
        problem = inner.check_spec(spec["inner_spec"])
        if problem is not None:
            return f"inner_spec: {problem}"
        count = inner.stream_count(spec["inner_spec"])
        if len(spec["streams"]) != count:
            return f"{spec['inner_type']} has {count} streams"
        for layout in spec["streams"]:
            if layout["n_chunks"] != -(-layout["n"] // huffman.CHUNK):
                return f"a stream of {layout['n']} symbols needs {-(-layout['n'] // 4096)} chunks"
            if layout["n"] > 8 * layout["n_bytes"]:
                return f"{layout['n']} symbols cannot fit in {layout['n_bytes']} bytes"
        return None

    def verify(self) -> None:
        self._restore()
        self.inner.verify()

    def _restore(self) -> None:
        if self._decoded == self.payload._version:
            return
        at = sum(payload_bytes(layout) for layout in self.layouts)
        coded = unpack_payload(self.payload[:at], self.layouts)
        symbols = [huffman.decode(c) for c in coded]
        for i, (stream, bits) in enumerate(zip(symbols, self.symbol_bits, strict=True)):
            top = int(stream.max()) if stream.numel() else 0
            if i != self.mask and bits < 8 and top >= 1 << bits:
                raise ValueError(f"stream {i} holds symbol {top}, over {bits} bits")
        if self.mask is not None and self.positions == "gaps":
            symbols[self.mask] = mask_from_gaps(symbols[self.mask], self.n_weights, self.escape)
        with torch.no_grad():
            for name in self.raw_names:
                t = self._tensor(name)
                dtype = _dtype(self.floats or "float32") if t.is_floating_point() else t.dtype
                size = t.numel() * dtype.itemsize
                stored = self.payload[at : at + size].clone().view(dtype)
                t.copy_(stored.reshape(t.shape).to(t.dtype))
                at += size
        expected = [t.numel() for t in _symbols(self.inner)]
        if [t.numel() for t in symbols] != expected:
            raise ValueError(
                f"decoded streams of {[t.numel() for t in symbols]} symbols, expected {expected}"
            )
        self.inner.set_streams(symbols)
        self._decoded = self.payload._version

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._restore()
        return self.inner(*args, **kwargs)

    def deployed(self) -> nn.Module:
        self._restore()
        return self.inner.deployed()

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inner_type": type(self.inner).__name__,
            "inner_spec": self.inner.spec(),
            "streams": self.layouts,
            "positions": self.positions,
        }
        if self.positions == "gaps":
            out["escape"] = self.escape
        if self.floats is not None:
            out["floats"] = self.floats
        return out

    def n_params(self) -> int:
        # the wrapped layer counts the weights it represents; its parameters turned buffers
        return self.held_params

    def bits_per_symbol(self) -> list[float]:
        """Mean coded bits per symbol of each stream, lengths and offsets included."""
        return [8.0 * payload_bytes(s) / max(s["n"], 1) for s in self.layouts]

    def describe(self) -> str:
        rates = ", ".join(
            f"{name} {rate:.2f} bits/symbol"
            for name, rate in zip(self.stream_names, self.bits_per_symbol(), strict=True)
        )
        where = f"; other tensors in the payload as {self.floats}" if self.floats else ""
        return f"Huffman-coded {rates}{where}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decoded"] = None
        return state


@dataclasses.dataclass(frozen=True)
class HuffmanConfig(StageConfig):
    """Huffman-code the integer streams of k-means, quantized and sparse layers: the kept
    positions of a sparse layer as ``gaps`` (run lengths, Deep Compression's relative
    indices) or mask ``bytes``; the layer's other tensors go into the same payload with
    floating ones stored as ``floats`` (``float32``: lossless; ``float16``: rounded, half
    the bytes)."""

    kind = "encode"
    method = "huffman"

    positions: Literal["gaps", "bytes"] = "gaps"
    floats: Literal["float32", "float16"] = "float32"


@register(HuffmanConfig, types=stream_layers)
def apply_huffman(model: nn.Module, config: HuffmanConfig, ctx: Context) -> nn.Module:
    def make(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, CompressedModule)
        return HuffmanCoded.wrap(module, config.positions, config.floats)

    swap_modules(model, ctx.names, make)
    return model
