"""W8A8 dynamic: int8 per-channel weights x int8 per-token activations, real int8 GEMM.

``DynamicQuantLinear`` stores ``qweight`` (N, K) int8, ``scale`` (N, 1) and, after
SmoothQuant, ``smooth`` (K,) = 1 / s, the factor applied to the input before it is quantized.
The kernel (see ``kernels``) is part of the layer's spec: ``auto`` (the default) is resolved
when the layer runs, on the machine that runs it, so one artifact is fast on any CPU; the
integer codes and scales are the same whichever kernel runs them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.calib.capture import input_absmax
from slimkit.compressed import CompressedModule, compressed_module
from slimkit.config import Granularity, StageConfig
from slimkit.context import Context
from slimkit.errors import ConfigError
from slimkit.formats import primitives as P
from slimkit.formats.affine import AffineFormat
from slimkit.layers.shapes import LinearOp
from slimkit.quant import kernels
from slimkit.quant.smoothquant import smoothing_factors
from slimkit.registry import register
from slimkit.select import swap_modules
from slimkit.spec_rules import Rule, spec_choice

KERNEL_NOTES = {
    "int_mm": "torch._int_mm int8 GEMM",
    "fbgemm": "fbgemm int8 GEMM (7-bit activation codes)",
    "reference": "integer arithmetic on the fp32 kernel (no faster)",
}


@compressed_module
class DynamicQuantLinear(LinearOp, CompressedModule):
    """A Linear computed as int8 x int8 with per-token activation scales found on the fly."""

    qweight: torch.Tensor
    scale: torch.Tensor
    smooth: torch.Tensor | None
    spec_rules: ClassVar[dict[str, Rule]] = {"kernel": spec_choice("auto", *KERNEL_NOTES)}
    #: the input is quantized on the fly to symmetric codes of this many bits per token
    dynamic_activations: ClassVar[int] = 8

    def _init_storage(
        self, shape: tuple[int, ...], smoothquant: bool = False, kernel: str = "auto"
    ) -> None:
        out_features, in_features = shape
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))
        self.register_buffer("smooth", torch.ones(in_features) if smoothquant else None)
        self.kernel = kernel  # "auto" is resolved when the layer first runs, on that machine
        self._prepared: tuple[tuple[int, int, str], kernels.Int8Weight] | None = None

    def storage_spec(self) -> dict[str, Any]:
        return {"smoothquant": self.smooth is not None, "kernel": self.kernel}

    @classmethod
    def from_float(  # type: ignore[override]
        cls, m: nn.Linear, smooth: torch.Tensor | None = None, kernel: str = "auto"
    ) -> DynamicQuantLinear:
        """Quantize ``m``; with ``smooth`` = s (K,), store ``W * s`` and apply 1 / s to inputs."""
        q: DynamicQuantLinear = cls.empty_like(m, smoothquant=smooth is not None, kernel=kernel)
        w = m.weight.detach().float()  # (N, K)
        if smooth is not None:
            w = w * smooth.reshape(1, -1)
            assert q.smooth is not None
            q.smooth.copy_(1.0 / smooth)
        scale, zero = P.qparams(w, 8, symmetric=True, per_channel=True)
        q.qweight.copy_(P.quantize(w, scale, zero, 8, symmetric=True))
        q.scale.copy_(scale)
        return q

    def _weight(self) -> kernels.Int8Weight:
        """The kernel's form of the weight, rebuilt when the buffers change."""
        key = (self.qweight._version, self.scale._version, kernels.int8_kernel(self.kernel))
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, kernels.prepare(self.qweight, self.scale, key[2]))
        return self._prepared[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # (M, K)
        if self.smooth is not None:
            rows = rows * self.smooth
        y = kernels.int8_linear(rows, self._weight())  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def format(self) -> AffineFormat:
        """The weight's storage as a weight format: int8 per-channel symmetric codes, the
        SmoothQuant factor as the input scale (for an exporter or a report)."""
        shape = (self.out_features, self.in_features)
        smooth = self.smooth is not None
        return AffineFormat(shape, 8, True, Granularity.PER_CHANNEL, None, smooth)

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors of ``format``, by its names."""
        out = {"qweight": self.qweight, "scale": self.scale}
        return out if self.smooth is None else {**out, "in_scale": self.smooth}

    def unpacked(self) -> torch.Tensor:
        return self.qweight

    def dense_weight(self) -> torch.Tensor:
        return self.format.decode(self.stored(), self.qweight)

    def n_params(self) -> int:
        return self.qweight.numel()

    def describe(self) -> str:
        smooth = ", SmoothQuant" if self.smooth is not None else ""
        return (
            f"int8 per-channel weights x int8 per-token dynamic activations{smooth}, "
            f"{KERNEL_NOTES[kernels.int8_kernel(self.kernel)]}"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_prepared"] = None  # the packed kernel weight is rebuilt, never copied
        return state


@dataclasses.dataclass(frozen=True)
class W8A8Config(StageConfig):
    """int8 weights and per-token dynamic int8 activations for Linear layers."""

    kind = "quantize"
    method = "w8a8-dynamic"

    smoothquant: bool = False
    alpha: float = 0.5
    kernel: str = "auto"

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            self.fail("alpha", "a number in 0..1")
        if self.kernel not in kernels.KERNELS:
            self.fail("kernel", ", ".join(kernels.KERNELS))


@register(W8A8Config, types=(nn.Linear,))
def apply_w8a8(model: nn.Module, config: W8A8Config, ctx: Context) -> nn.Module:
    stats: dict[str, torch.Tensor] = {}
    if config.smoothquant:
        stats = input_absmax(model, ctx.names, ctx.need_data("w8a8-dynamic smoothquant"))
        ctx.report(f"smoothquant: activation ranges of {len(stats)} layers")

    def make(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.Linear)
        smooth = None
        if config.smoothquant:
            if name not in stats:
                raise ConfigError(f"layer {name!r} saw no calibration input")
            smooth = smoothing_factors(stats[name], module.weight, config.alpha)
        return DynamicQuantLinear.from_float(module, smooth, config.kernel)

    swap_modules(model, ctx.names, make)
    return model
