"""Export to ONNX, keeping each layer's compressed form.

The model is first turned into its *deploy twin*: every compressed layer is replaced by a
small module that computes the same thing from what the layer stores, in operations that
ONNX has:

- affine integer weights (rtn, gptq, awq, mixed, the weights of w8a8 and w8a8-static):
  the integer codes as an int8 constant (int4 when every code fits, which holds for 2..4-bit
  layers: ONNX packs it two codes a byte) into ``DequantizeLinear`` with the layer's scales:
  per tensor, per output channel (``axis``) or per group of inputs (``block_size``);
  ``in_scale`` (AWQ, SmoothQuant) as a ``Mul`` on the layer input. For onnxruntime
  (``ort_kernels=True``) a Linear whose codes fit 4 bits in groups of a power of two >= 16 becomes
  one ``com.microsoft.MatMulNBits`` node instead: its codes packed two a byte, one scale (and
  zero point, when not 8) per group, the last group of a row shorter when the group size does
  not divide the input size; onnxruntime runs it without ever expanding the weight;
- static activation ranges (w8a8-static, QAT): ``QuantizeLinear`` / ``DequantizeLinear`` on
  the layer input (a ``Clip`` between them below 8 bits), the runtime's integer pattern;
- w8a8 dynamic: the int8 weight as above (its SmoothQuant factor is the format's input
  scale). For onnxruntime the input is quantized per token in the graph (``ReduceMax`` of
  ``Abs``, ``Round``, ``Cast``) into ``MatMulInteger`` with the codes, the layer's own
  integer arithmetic, as int8 x int8 or as both shifted to uint8, whichever onnxruntime runs
  faster on the exporting machine (measured once); for OpenVINO the activations stay float;
- codebooks (k-means, NF4): the indices as a uint8 constant (int4 below 5 bits would need a
  ``Cast`` that runtimes lack; uint8 is one byte a weight) into ``Gather`` from the codebook;
- bf16 weights: a bf16 constant ``Cast`` to fp32;
- sparse layers: the dense weight (the runtime computes densely; the file is fp32-sized);
- factorized, separable, pruned and searched models: their smaller float layers as they are.

A layer whose form cannot be written (a simulated layer, an unknown compressed layer) is a
ValueError naming the layer and the form before anything is written.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import ComposedModule, CompressedModule
from slimkit.data import Batch
from slimkit.formats.affine import AffineFormat, scale_shape
from slimkit.formats.bf16 import BFloat16Format
from slimkit.formats.codebook import CodebookFormat
from slimkit.formats.nf4 import LEVELS, NF4Format
from slimkit.formats.primitives import qrange
from slimkit.layers.shapes import Conv2dOp, EmbeddingOp, LinearOp
from slimkit.layers.weight import FormatWeight

#: ONNX opset: 21 has int4 and blocked (per-group) DequantizeLinear
OPSET = 21


# -- ONNX operators as autograd functions (eager math + their ONNX node) -----------------------
class _Dequantize(torch.autograd.Function):
    """``(codes - zero) * scale``: one scale for the tensor (``axis`` -1), one per index of
    ``axis``, or one per ``block`` consecutive indices of ``axis``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int,
        block: int,
    ) -> torch.Tensor:  # fmt: skip
        s, z = scale, zero.float()
        if axis >= 0:
            if block:  # the last block along ``axis`` may be shorter
                n = codes.shape[axis]
                s = s.repeat_interleave(block, dim=axis).narrow(axis, 0, n)
                z = z.repeat_interleave(block, dim=axis).narrow(axis, 0, n)
            else:
                view = [1] * codes.dim()
                view[axis] = -1
                s, z = s.reshape(view), z.reshape(view)
        return (codes.float() - z) * s

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, zero: Any, axis: int, block: int) -> Any:
        if axis < 0:
            return g.op("DequantizeLinear", codes, scale, zero)
        if block:
            return g.op("DequantizeLinear", codes, scale, zero, axis_i=axis, block_size_i=block)
        return g.op("DequantizeLinear", codes, scale, zero, axis_i=axis)


class _MatMulNBits(torch.autograd.Function):
    """``x @ weight.T`` for the (N, K) weight ``(codes - zero) * scale`` per group of
    ``block`` inputs, computed from the packed tensors of :func:`nbits_tensors` (eager) or as
    onnxruntime's ``MatMulNBits`` on them (ONNX)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
        zeros: torch.Tensor | None, k: int, block: int,
    ) -> torch.Tensor:  # fmt: skip
        return torch.matmul(x, nbits_weight(packed, scales, zeros, k).t())

    @staticmethod
    def symbolic(g: Any, x: Any, packed: Any, scales: Any, zeros: Any, k: int, block: int) -> Any:
        n = packed.type().sizes()[0]
        inputs = [x, packed, scales] + ([] if _is_none(zeros) else [zeros])
        y = g.op(
            "com.microsoft::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=NBITS,
            block_size_i=block,
        )  # fmt: skip
        sizes = x.type().varyingSizes()  # the exporter's shape inference: x's, last one N
        if sizes is not None:
            y.setType(x.type().with_sizes([*sizes[:-1], n]))
        return y


def nbits_weight(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int
) -> torch.Tensor:
    """The (N, K) fp32 weight the ``MatMulNBits`` tensors hold."""
    n, g, half = packed.shape
    u = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, g, 2 * half).float()
    if zeros is None:
        z = torch.full((n, g, 1), 8.0)
    else:
        both = torch.stack([zeros & 0x0F, zeros >> 4], dim=-1).reshape(n, -1)
        z = both[:, :g].float().unsqueeze(-1)
    w = (u - z) * scales.reshape(n, g, 1)
    return w.reshape(n, -1)[:, :k]


def _is_none(value: Any) -> bool:
    return bool(value.node().mustBeNone()) if hasattr(value, "node") else value is None


#: the bit width of the codes ``MatMulNBits`` is given (every 2..4-bit code fits)
NBITS = 4


def nbits_tensors(
    codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``MatMulNBits``' constants for (N, K) integer ``codes`` with (N, G) ``zero`` and
    ``scale`` per group of ``block`` inputs (the last group may be shorter): ``(packed (N,
    G, block / 2) uint8, scales (N * G,), zero points packed two a byte per row or None when
    every one is 8)``; None when the codes do not fit 4 unsigned bits or ``block`` is not a
    power of two >= 16."""
    n, k = codes.shape
    g = -(-k // block)
    if block < 16 or block & (block - 1) or zero.shape != (n, g) or scale.shape != (n, g):
        return None
    c, z0 = codes.to(torch.int16), zero.round().to(torch.int16)

    def fits(offset: int) -> bool:
        lo, hi = min(int(c.min()), int(z0.min())), max(int(c.max()), int(z0.max()))
        return lo + offset >= 0 and hi + offset <= 15

    # signed codes shift by 8 (a symmetric layer's zero points then are the default 8)
    offset = next((o for o in (8, 0) if fits(o)), None)
    if offset is None:
        return None
    u, z = c + offset, z0 + offset
    pad = g * block - k  # the short last group: padded with its zero point (weight 0)
    if pad:
        u = torch.cat([u, z[:, -1:].expand(n, pad)], dim=1)
    u = u.to(torch.uint8).reshape(n, g, block // 2, 2)
    packed = (u[..., 0] | (u[..., 1] << 4)).contiguous()
    zeros = None
    if bool((z != 8).any()):
        zp = z.to(torch.uint8)
        if g % 2:
            zp = torch.cat([zp, torch.full((n, 1), 8, dtype=torch.uint8)], dim=1)
        zeros = (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1).contiguous()
    return packed, scale.float().reshape(-1).contiguous(), zeros


class _DynamicInt8(torch.autograd.Function):
    """``x @ W`` with ``x`` quantized on the fly to symmetric int8 per row (token) and ``W``
    (K, N) integer codes with one scale per output column: eager, that integer arithmetic;
    in ONNX, the row scales from ``ReduceMax(Abs(x))`` and one ``MatMulInteger``.

    ``codes`` are int8 (``offset`` 0: int8 x int8) or the int8 codes + 128 as uint8 (``offset``
    128: both operands shifted to uint8 around a zero point of 128). Both are exact; which is
    faster depends on the CPU (:func:`slimkit.deploy.choose.int8_layout`). The third form,
    uint8 x int8, is left out: without VNNI its 16-bit pairwise sums saturate."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: int
    ) -> torch.Tensor:
        s = x.abs().amax(dim=-1, keepdim=True).clamp(min=DYNAMIC_EPS) / 127.0
        q = torch.round(x / s)
        w = codes.double() - offset if offset else codes.double()
        return (torch.matmul(q.double(), w).float() * s) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, codes: Any, scale: Any, offset: int) -> Any:
        axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        amax = g.op("ReduceMax", g.op("Abs", x), axes, keepdims_i=1)
        eps = g.op("Constant", value_t=torch.tensor(DYNAMIC_EPS))
        s = g.op("Div", g.op("Max", amax, eps), g.op("Constant", value_t=torch.tensor(127.0)))
        q = g.op("Round", g.op("Div", x, s))
        if offset:
            q = g.op("Add", q, g.op("Constant", value_t=torch.tensor(float(offset))))
            zero = g.op("Constant", value_t=torch.tensor(offset, dtype=torch.uint8))
            y = g.op("MatMulInteger", g.op("Cast", q, to_i=2), codes, zero, zero)  # UINT8
        else:
            y = g.op("MatMulInteger", g.op("Cast", q, to_i=3), codes)  # INT8
        return g.op("Mul", g.op("Mul", g.op("Cast", y, to_i=1), s), scale)  # FLOAT


#: the floor of a row's max |x| in dynamic quantization (as the torch kernels)
DYNAMIC_EPS = 1e-12


class _FakeQuant(torch.autograd.Function):
    """``x`` rounded to ``bits``-bit codes of one scale and zero point and back."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        q = torch.clamp(torch.round(x / scale) + zero.float(), lo, hi)
        return (q - zero.float()) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero: Any, lo: int, hi: int) -> Any:
        q = g.op("QuantizeLinear", x, scale, zero)
        if (lo, hi) != (-128, 127):
            low = g.op("Constant", value_t=torch.tensor(lo, dtype=torch.int8))
            high = g.op("Constant", value_t=torch.tensor(hi, dtype=torch.int8))
            q = g.op("Clip", q, low, high)
        return g.op("DequantizeLinear", q, scale, zero)


# -- the deploy twin --------------------------------------------------------------------------
class _Deployed(nn.Module):
    """One compressed layer in ONNX-expressible operations (see the module docstring)."""

    def __init__(self, layer: FormatWeight | nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind  # linear, conv, embedding
        self.geometry: dict[str, Any] = {}
        if isinstance(layer, Conv2dOp):
            self.geometry = {
                "stride": layer.stride,
                "padding": layer.padding,
                "dilation": layer.dilation,
                "groups": layer.groups,
            }
        self.padding_idx = getattr(layer, "padding_idx", None)
        bias = getattr(layer, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.act: tuple[int, int] | None = None

    def set_activations(
        self, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool
    ) -> None:
        self.register_buffer("act_scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("act_zero", zero.detach().round().to(torch.int8).reshape(()))
        self.act = qrange(bits, sym)

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_t(self) -> torch.Tensor:
        """A Linear's weight transposed, (in, out): a MatMul's right operand."""
        return self.weight().t()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """A Linear's product of its (quantized, scaled) input with the weight."""
        return torch.matmul(x, self.weight_t())

    def input_scale(self) -> torch.Tensor | None:
        """A factor per input channel applied to the (quantized) input rather than folded
        into the weight: the weight's constant then feeds its MatMul or Conv directly, the
        pattern runtimes compile into integer kernels."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = _FakeQuant.apply(x, self.act_scale, self.act_zero, *self.act)
        scale = self.input_scale()
        if scale is not None:
            x = x * (scale if self.kind == "linear" else scale.reshape(-1, 1, 1))
        if self.kind == "linear":
            y = self.matmul(x)
            return y if self.bias is None else y + self.bias
        w = self.weight()
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, **self.geometry)
        return F.embedding(x, w, self.padding_idx)


class _AffineDeployed(_Deployed):
    """Integer codes into one ``DequantizeLinear`` laid out for the consumer: a Linear's
    codes transposed (in, out) straight into its MatMul, a convolution's per-channel codes
    in their own shape into the Conv (the patterns runtimes fuse into integer kernels);
    grouped convolutions as (out, in * kh * kw) rows reshaped."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    in_scale: torch.Tensor | None

    def __init__(
        self,
        layer: nn.Module,
        kind: str,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        group_size: int | None,
        in_scale: torch.Tensor | None,
    ) -> None:
        super().__init__(layer, kind)
        self.shape = tuple(codes.shape)
        rows, r = codes.reshape(codes.shape[0], -1), codes.shape[0]  # (R, K)
        per_tensor = scale.numel() == 1
        z = torch.zeros_like(scale) if zero is None else zero.reshape(scale.shape)
        s, z = scale.reshape(r, -1) if not per_tensor else scale, z.reshape(scale.shape)
        self.axis, self.block = -1, group_size or 0
        if per_tensor:
            q, s, z = rows.t() if kind == "linear" else codes, scale.reshape(()), z.reshape(())
        elif kind == "linear":
            q, s, z = rows.t(), s.t(), z.reshape(r, -1).t()  # (K, N), (G, N)
            self.axis = 0 if self.block else 1
            if not self.block:
                s, z = s.reshape(-1), z.reshape(-1)
        elif not self.block:
            q, s, z, self.axis = codes, s.reshape(-1), z.reshape(-1), 0
        else:
            q, z, self.axis = rows, z.reshape(r, -1), 1
        # a short last group: codes padded to whole blocks and the weight cut back after
        # DequantizeLinear (OpenVINO takes only whole blocks; the padding never reaches x)
        self.length = q.shape[self.axis] if self.axis >= 0 else 0
        if self.block and self.length % self.block:
            pad = [0, 0] * q.dim()
            pad[2 * (q.dim() - 1 - self.axis) + 1] = -self.length % self.block
            q = F.pad(q.to(torch.int8), pad)
        self.register_buffer("codes", q.to(torch.int8).contiguous())
        self.register_buffer("scale", s.float().contiguous())
        self.register_buffer("zero", z.round().to(torch.int8).contiguous())
        self.register_buffer("in_scale", None if in_scale is None else in_scale.detach().clone())
        self.nbits = False
        self.dynamic = False

    def use_dynamic(self, bits: int) -> bool:
        """Quantize the input to int8 per token on the fly and multiply the integer codes
        (``MatMulInteger``), where the layer is a Linear of int8 codes, one scale per output
        channel, symmetric; whether it does."""
        from slimkit.deploy.choose import int8_layout

        ok = bits == 8 and self.kind == "linear" and self.axis == 1
        self.dynamic = ok and not bool(self.zero.any())
        self.offset = 128 if self.dynamic and int8_layout() == "u8u8" else 0
        if self.offset:
            self.codes = (self.codes.to(torch.int16) + self.offset).to(torch.uint8)
        return self.dynamic

    def use_nbits(self) -> bool:
        """Run as onnxruntime's ``MatMulNBits`` where the layer fits it (a Linear of 4-bit
        codes in groups); whether it does."""
        found = None
        if self.kind == "linear" and self.block and self.axis == 0:
            # stored (K, N) / (G, N): MatMulNBits takes them per output row
            codes = self.codes[: self.length].t()  # (N, K), without the block padding
            found = nbits_tensors(codes, self.zero.t(), self.scale.t(), self.block)
        if found is not None:
            packed, scales, zeros = found
            self.register_buffer("nbits_packed", packed)
            self.register_buffer("nbits_scales", scales)
            self.register_buffer("nbits_zeros", zeros)
            for name in ("codes", "scale", "zero"):  # not written: the packed form replaces them
                delattr(self, name)
                self.register_buffer(name, None)
            self.nbits = True
        return self.nbits

    def _dequantized(self) -> torch.Tensor:
        w = _Dequantize.apply(self.codes, self.scale, self.zero, self.axis, self.block)
        if self.block and w.shape[self.axis] != self.length:
            w = w.narrow(self.axis, 0, self.length)
        return w  # type: ignore[no-any-return]

    def _on_input(self) -> bool:
        """Whether ``in_scale`` can go on the input: one factor per input channel (a
        Linear, or a convolution of groups 1)."""
        return self.kind == "linear" or (self.kind == "conv" and self.geometry["groups"] == 1)

    def input_scale(self) -> torch.Tensor | None:
        return self.in_scale if self._on_input() else None

    def weight_t(self) -> torch.Tensor:
        return self._dequantized()  # (K, N); in_scale goes on the input

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return _DynamicInt8.apply(x, self.codes, self.scale, self.offset)  # type: ignore[no-any-return]
        if self.nbits:
            k = self.shape[1]
            return _MatMulNBits.apply(  # type: ignore[no-any-return]
                x, self.nbits_packed, self.nbits_scales, self.nbits_zeros, k, self.block
            )
        return super().matmul(x)

    def weight(self) -> torch.Tensor:
        w = self._dequantized().reshape(self.shape)
        if self.in_scale is not None and not self._on_input():
            view = [1] * len(self.shape)
            view[1] = -1
            w = w * self.in_scale.reshape(view)
        return w


class _CodebookDeployed(_Deployed):
    """``codebook[indices]`` (k-means) or ``LEVELS[indices] * scale`` per group (NF4)."""

    def __init__(
        self,
        layer: nn.Module,
        kind: str,
        shape: tuple[int, ...],
        codebook: torch.Tensor,
        indices: torch.Tensor,
        scale: torch.Tensor | None = None,
        block: int = 0,
    ) -> None:
        super().__init__(layer, kind)
        self.shape = shape
        self.block = block  # the group size of ``scale`` (0: K / G)
        self.register_buffer("codebook", codebook.detach().float().clone())
        self.register_buffer("indices", indices.to(torch.uint8).reshape(shape[0], -1).clone())
        self.register_buffer("group_scale", None if scale is None else scale.float().clone())

    codebook: torch.Tensor
    indices: torch.Tensor
    group_scale: torch.Tensor | None

    def weight(self) -> torch.Tensor:
        w = self.codebook[self.indices.long()]  # (R, K)
        if self.group_scale is not None:
            r, k = w.shape
            g = self.group_scale.shape[1]
            block = self.block or k // g
            pad = g * block - k  # a short last group: padded with zeros, then cut off
            if pad:
                w = F.pad(w, (0, pad))
            w = (w.reshape(r, g, block) * self.group_scale.unsqueeze(-1)).reshape(r, g * block)
            if pad:
                w = w[:, :k]
        return w.reshape(self.shape)


class _CastDeployed(_Deployed):
    """A 16-bit float weight constant, cast to fp32 in the graph."""

    weight16: torch.Tensor

    def __init__(self, layer: nn.Module, kind: str, weight: torch.Tensor) -> None:
        super().__init__(layer, kind)
        self.register_buffer("weight16", weight.detach().clone())

    def weight(self) -> torch.Tensor:
        return self.weight16.float()


class _DenseDeployed(_Deployed):
    dense: torch.Tensor

    def __init__(self, layer: nn.Module, kind: str, weight: torch.Tensor) -> None:
        super().__init__(layer, kind)
        self.register_buffer("dense", weight.detach().float().clone())

    def weight(self) -> torch.Tensor:
        return self.dense


def _kind(layer: nn.Module) -> str | None:
    if isinstance(layer, LinearOp):
        return "linear"
    if isinstance(layer, Conv2dOp):
        return "conv"
    if isinstance(layer, EmbeddingOp):
        return "embedding"
    return None


def deploy_layer(name: str, layer: nn.Module, ort_kernels: bool = False) -> nn.Module:
    """The ONNX-expressible twin of one compressed layer (with ``ort_kernels``, grouped 4-bit
    Linears as ``MatMulNBits`` and w8a8 as ``MatMulInteger``); ValueError naming the layer
    when its form cannot be written."""
    layer = layer.deployed() if isinstance(layer, CompressedModule) else layer
    if not isinstance(layer, CompressedModule) or isinstance(layer, ComposedModule):
        return layer
    problem = _problem(name, layer)
    if problem is not None:
        raise ValueError(problem)
    kind = _kind(layer)
    assert kind is not None
    # the layer's weight format (FormatWeight, or a layer that describes its storage as one)
    fmt = getattr(layer, "format", None)
    held: Any = layer
    out: _Deployed
    if isinstance(fmt, AffineFormat):
        t = held.stored()
        out = _AffineDeployed(
            layer, kind, held.unpacked(), t["scale"], t.get("zero_point"), fmt.group_size,
            t.get("in_scale"),
        )  # fmt: skip
        if ort_kernels:
            bits = getattr(layer, "dynamic_activations", None)
            if bits is not None:
                out.use_dynamic(bits)
            else:
                out.use_nbits()
    elif isinstance(fmt, NF4Format):
        rows = scale_shape(fmt.shape, fmt.granularity.value != "per_tensor", fmt.group_size)
        scale = held.stored()["scale"].reshape(rows)
        out = _CodebookDeployed(
            layer, kind, fmt.shape, LEVELS, held.unpacked(), scale, fmt.group_size or 0
        )
    elif type(fmt) is CodebookFormat:
        codebook = held.stored()["codebook"]
        out = _CodebookDeployed(layer, kind, fmt.shape, codebook, held.unpacked())
    elif isinstance(fmt, BFloat16Format):
        out = _CastDeployed(layer, kind, held.stored()["weight"])
    else:  # sparse and sparse-codebook layers: dense
        out = _DenseDeployed(layer, kind, layer.dense_weight())
    act_scale = getattr(layer, "act_scale", None)
    if act_scale is not None:
        act: Any = layer
        out.set_activations(act.act_scale, act.act_zero, act.act_bits, act.act_symmetric)
    return out


def deploy_twin(model: nn.Module, ort_kernels: bool = False) -> nn.Module:
    """A copy of ``model`` whose compressed layers are their ONNX-expressible twins (with
    ``ort_kernels``, onnxruntime's kernels where a layer fits them)."""
    import copy

    twin = copy.deepcopy(model).eval()
    for name, module in list(twin.named_modules()):
        if not name or not isinstance(module, CompressedModule):
            continue
        parent, _, attr = name.rpartition(".")
        owner = twin.get_submodule(parent) if parent else twin
        if isinstance(owner, _Deployed) or not hasattr(owner, attr):
            continue
        replacement = deploy_layer(name, module, ort_kernels)
        if replacement is not module:
            setattr(owner, attr, replacement)
    return twin


def check_exportable(model: nn.Module) -> None:
    """ValueError naming the first layer the onnx format cannot express (nothing built)."""
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule):
            problem = _problem(name, module.deployed())
            if problem is not None:
                raise ValueError(problem)


def _problem(name: str, layer: nn.Module) -> str | None:
    """Why the compressed ``layer`` cannot be written, or None."""
    if not isinstance(layer, CompressedModule) or isinstance(layer, ComposedModule):
        return None
    form = type(layer).__name__
    if layer.simulated:
        return f"layer {name!r} ({form}) only simulates its compression"
    if _kind(layer) is None:
        return f"layer {name!r}: the onnx format cannot express a {form}"
    return None


# -- the ONNX graph ---------------------------------------------------------------------------
def input_names(example: Batch) -> list[str]:
    """The ONNX input names for ``example``: a dict's keys, ``input`` or ``input_<i>``."""
    return _inputs(example)[2]


def _inputs(example: Batch) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """Positional args, keyword args and input names of ``example``."""
    if isinstance(example, dict):
        return (), dict(example), list(example)
    if isinstance(example, torch.Tensor):
        return (example,), {}, ["input"]
    args = tuple(example)
    return args, {}, [f"input_{i}" for i in range(len(args))]


class _Positional(nn.Module):
    """``model(**dict(zip(names, args)))``: dict inputs as positional ONNX inputs; the first
    output (a Hugging Face model's ``last_hidden_state``, a tensor as is)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args, strict=True)))
        if isinstance(out, torch.Tensor):
            return out
        first = out[0] if isinstance(out, tuple | list) else next(iter(out.values()))
        return first  # type: ignore[no-any-return]


def onnx_bytes(
    model: nn.Module, example: Batch, dynamic_axes: bool = True, ort_kernels: bool = False
) -> bytes:
    """The ONNX model (serialized) of ``model``'s deploy twin run on ``example``; with
    ``ort_kernels``, onnxruntime's ``MatMulNBits`` and ``MatMulInteger`` where layers fit."""
    import onnx

    twin = deploy_twin(model, ort_kernels)
    args, kwargs, names = _inputs(example)
    if kwargs:
        twin, args = _Positional(twin, names), tuple(kwargs.values())
    axes: dict[str, dict[int, str]] = {}
    if dynamic_axes:
        for n, a in zip(names, args, strict=True):
            axes[n] = {0: "batch"} if a.dim() < 2 else {0: "batch", 1: "sequence"}
            if a.dim() == 4:
                axes[n] = {0: "batch"}
        axes["output"] = (
            {0: "batch"} if args[0].dim() != 2 or not kwargs else {0: "batch", 1: "sequence"}
        )
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            twin, args, buffer,  # type: ignore[arg-type]
            dynamo=False, opset_version=OPSET, input_names=names, output_names=["output"],
            dynamic_axes=axes or None, do_constant_folding=False,
            custom_opsets={"com.microsoft": 1} if _uses_nbits(twin) else None,
        )  # fmt: skip
    graph = onnx.load_from_string(buffer.getvalue())
    _fold_transposes(graph)
    _narrow_codes(graph)
    return bytes(graph.SerializeToString())


def _uses_nbits(twin: nn.Module) -> bool:
    return any(isinstance(m, _AffineDeployed) and m.nbits for m in twin.modules())


def _fold_transposes(model: Any) -> None:
    """Replace each ``Transpose`` of a float weight constant by the transposed constant (a
    Linear's float weight becomes a MatMul operand, as runtimes and quantizers expect);
    nothing else is folded, so integer codes stay integers."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    keep = []
    for node in graph.node:
        source = str(node.input[0]) if node.op_type == "Transpose" else ""
        if source in inits and inits[source].data_type == 1:  # FLOAT
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[source])
            folded = array.transpose(perm) if perm else array.T
            graph.initializer.append(numpy_helper.from_array(folded.copy(), node.output[0]))
            uses[source] -= 1
            if uses[source] == 0:
                graph.initializer.remove(inits.pop(source))
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _narrow_codes(model: Any) -> None:
    """Store the int8 codes of every weight ``DequantizeLinear`` as int4 when they all fit
    (exact: the same integers, half the bytes)."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        names = [n for n in node.input[:3:2] if n in inits]
        arrays = [numpy_helper.to_array(inits[n]) for n in names]
        if any(a.dtype.name != "int8" or a.size == 0 for a in arrays):
            continue
        if not all(int(a.min()) >= -8 and int(a.max()) <= 7 for a in arrays):
            continue
        for n, a in zip(names, arrays, strict=True):
            packed = _pack_int4(a)
            narrow = onnx.helper.make_tensor(n, onnx.TensorProto.INT4, a.shape, packed, raw=True)
            inits[n].CopyFrom(narrow)


def _pack_int4(a: Any) -> bytes:
    """Two's-complement 4-bit codes, two a byte, the first in the low nibble (ONNX's int4
    raw layout)."""
    import numpy as np

    u = (a.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    return bytes((u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes())
