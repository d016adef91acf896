"""The ``separable`` stage: standard convolutions replaced by depthwise + pointwise pairs.

MobileNet's building block: a ``k x k`` convolution from ``Cin`` to ``Cout`` channels
(``Cout * Cin * k * k`` weights) becomes a depthwise ``k x k`` convolution (``Cin * m``
filters, each reading one input channel; ``m`` is the depth multiplier) followed by a
pointwise 1x1 convolution from ``Cin * m`` to ``Cout`` channels: ``Cin * m * (k * k + Cout)``
weights and as many fewer multiply-adds per output pixel. The pair is initialised by the
least-squares fit to the original kernel (:mod:`slimkit.separable.fit`: a truncated SVD per
input channel) and the relative Frobenius error of the fit is reported per layer. A fit is
lossy unless ``m >= min(Cout, k * k)``, so the stage is meant to be followed by training
(a ``finetune`` or ``distill`` stage).

``SeparableConv2d`` holds the two convolutions as standard ``nn.Conv2d`` children (the
pointwise one carries the original bias); it rebuilds them from its spec when loaded and
its children's parameters are counted by :func:`slimkit.compressed.count_params` as those
of any other layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from slimkit.compressed import ComposedModule, ConvGeometry, compressed_module, conv_args
from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.registry import register
from slimkit.select import swap_modules
from slimkit.separable.fit import compose, separable_fit, separable_params


@compressed_module
class SeparableConv2d(ComposedModule, ConvGeometry):
    """A depthwise convolution (``in_channels * depth_multiplier`` filters, groups =
    ``in_channels``, no bias) then a pointwise 1x1 convolution to ``out_channels`` (with the
    original bias), standing for a standard ``Conv2d`` of the same geometry."""

    def _init_layer(
        self, depth_multiplier: int = 1, bias: bool = False, fit_error: float | None = None
    ) -> None:
        if depth_multiplier < 1:
            raise ValueError(f"depth_multiplier must be >= 1, got {depth_multiplier}")
        in_channels, out_channels = self.in_channels, self.out_channels
        self.depth_multiplier = depth_multiplier
        self.fit_error = fit_error
        mid = in_channels * depth_multiplier
        self.depthwise = nn.Conv2d(
            in_channels,
            mid,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            groups=in_channels,
            bias=False,
        )
        self.pointwise = nn.Conv2d(mid, out_channels, 1, bias=bias)

    @classmethod
    def fit(cls, conv: nn.Conv2d, depth_multiplier: int = 1) -> SeparableConv2d:
        """The least-squares separable twin of the standard convolution ``conv``."""
        if conv.groups != 1:
            raise ValueError(f"groups={conv.groups}: only standard (groups=1) convolutions")
        args = conv_args(conv)  # ValueError for string padding or another padding mode
        del args["groups"]
        fitted = separable_fit(conv.weight, depth_multiplier)
        out = cls(
            **args,
            depth_multiplier=depth_multiplier,
            bias=conv.bias is not None,
            fit_error=fitted.error,
        )
        out.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            out.depthwise.weight.copy_(fitted.depthwise)
            out.pointwise.weight.copy_(fitted.pointwise)
            if conv.bias is not None:
                assert out.pointwise.bias is not None
                out.pointwise.bias.copy_(conv.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W)
        return self.pointwise(self.depthwise(x))  # (B, Cout, H', W')

    def spec(self) -> dict[str, Any]:
        return {
            **self.geometry_spec(with_groups=False),
            "depth_multiplier": self.depth_multiplier,
            "bias": self.pointwise.bias is not None,
            "fit_error": self.fit_error,
        }

    def weights(self) -> int:
        """Weights of the depthwise and pointwise kernels (bias not counted)."""
        kh, kw = self.kernel_size
        return separable_params(self.in_channels, self.out_channels, kh, kw, self.depth_multiplier)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent standard kernel (Cout, Cin, kh, kw)."""
        return compose(self.depthwise.weight, self.pointwise.weight, self.in_channels)

    def describe(self) -> str:
        kh, kw = self.kernel_size
        fit = "not recorded" if self.fit_error is None else f"{self.fit_error:.4f}"
        return (
            f"depthwise {kh}x{kw} (multiplier {self.depth_multiplier}) + pointwise 1x1, "
            f"{self.in_channels}->{self.out_channels} channels; relative fit error {fit}"
        )


@dataclasses.dataclass(frozen=True)
class SeparableConfig(StageConfig):
    """Replace standard Conv2d layers (groups 1, a kernel of at least ``min_kernel`` on its
    longer side) by a depthwise convolution with ``depth_multiplier`` filters per input
    channel and a pointwise 1x1 convolution, fitted to the original kernel by least squares.
    With ``skip_if_larger`` a layer whose separable form would hold at least as many weights
    as the original is left as it is."""

    kind = "separable"
    method = "depthwise"

    depth_multiplier: int = 1
    min_kernel: int = 3
    skip_if_larger: bool = True

    def validate(self) -> None:
        super().validate()
        if self.depth_multiplier < 1:
            self.fail("depth_multiplier", "an integer >= 1")
        if self.min_kernel < 2:
            self.fail("min_kernel", "an integer >= 2 (a 1x1 kernel has nothing to separate)")


def skip_reason(conv: nn.Conv2d, config: SeparableConfig) -> str | None:
    """Why ``conv`` stays as it is under ``config``, or None when it is converted."""
    kh, kw = conv.kernel_size
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return f"already a {kind} convolution (groups={conv.groups})"
    if max(kh, kw) < config.min_kernel:
        return f"kernel {kh}x{kw} is smaller than min_kernel {config.min_kernel}"
    try:
        conv_args(conv)
    except ValueError as e:
        return f"unsupported padding ({e})"
    if config.skip_if_larger:
        before = conv.weight.numel()
        after = separable_params(
            conv.in_channels, conv.out_channels, kh, kw, config.depth_multiplier
        )
        if after >= before:
            return (
                f"the separable form would hold {after} weights, not fewer than {before} "
                f"(skip_if_larger)"
            )
    return None


@register(SeparableConfig, types=(nn.Conv2d,))
def apply_separable(model: nn.Module, config: SeparableConfig, ctx: Context) -> nn.Module:
    counts = {"seen": 0, "converted": 0}

    def make(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.Conv2d)
        counts["seen"] += 1
        reason = skip_reason(module, config)
        if reason is not None:
            ctx.report(f"separable: {name} skipped: {reason}")
            return module
        layer = SeparableConv2d.fit(module, config.depth_multiplier)
        counts["converted"] += 1
        ctx.report(
            f"separable: {name}: {module.weight.numel()} -> {layer.weights()} weights, "
            f"relative fit error {layer.fit_error:.4f}"
        )
        return layer

    swap_modules(model, ctx.names, make)
    ctx.report(f"separable: {counts['converted']} of {counts['seen']} convolutions converted")
    return model
