"""Quantization-aware training with learned step sizes (LSQ, Esser et al. 2020).

During training each selected layer is wrapped (``QATLinear`` / ``QATConv2d``, never saved):
its weight and its input pass through an ``LSQQuantizer``,
``x_hat = round(clamp(x / s, qmin, qmax)) * s``, with the straight-through estimator for the
rounding (gradient 1 inside the range, 0 outside) and a learned step ``s`` whose gradient is
scaled by ``g = 1 / sqrt(n * qmax)`` (``n`` = values sharing the step in one example).

- weights: one step per output channel, symmetric codes ``[-(2^(b-1) - 1), 2^(b-1) - 1]``;
  ternary weights are the 2-bit case, codes ``{-1, 0, 1}``, the step initialised from TWN;
- inputs: one step per tensor; unsigned codes ``[0, 2^b - 1]`` when the first training batch
  holds no negative value (after a ReLU), else ``[-2^(b-1), 2^(b-1) - 1]``.

After training the wrappers are converted to stored integer layers with the learned steps:
weights to codes + per-channel scales, inputs to ``StaticQuantLinear`` / ``StaticQuantConv2d``
ranges (or plain ``QuantLinear`` / ``QuantConv2d`` with float inputs when ``act_bits`` is
null). Both sides compute the same values, so the converted model predicts as the trained one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.calib.capture import TrainBatch
from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.data import check_batch, writable
from slimkit.errors import DataError
from slimkit.formats import primitives as P
from slimkit.quant.common import MAX_BITS, MIN_BITS, check_convertible, empty_twin
from slimkit.quant.static import static_twin
from slimkit.registry import register
from slimkit.select import swap_modules
from slimkit.train.finetune import cross_entropy
from slimkit.train.fit import fit, shuffled
from slimkit.train.optim import torch_optimizer

WEIGHT_MODES = ("affine", "ternary")
_MIN_STEP = 1e-8  # steps are clamped here: a step trained to <= 0 would divide by zero


# -- straight-through pieces ---------------------------------------------------------------
class _RoundSTE(torch.autograd.Function):
    """``round(x)`` forward; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward (exactly); the gradient is multiplied by ``g``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)  # type: ignore[no-any-return]


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return _GradScale.apply(x, g)  # type: ignore[no-any-return]


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``round(clamp(x / step, qmin, qmax)) * step`` with a straight-through rounding."""
    return round_ste(torch.clamp(x / step, qmin, qmax)) * step


def lsq_init_step(x: torch.Tensor, qmax: int, per_channel: bool) -> torch.Tensor:
    """``2 * mean |x| / sqrt(qmax)``: (C, 1) per channel (rows = dim 0), else (1,)."""
    mag = x.detach().float().abs()
    mean = mag.reshape(mag.shape[0], -1).mean(dim=1, keepdim=True) if per_channel else mag.mean()
    step = 2.0 * mean / math.sqrt(qmax)
    return step.clamp(min=_MIN_STEP).reshape(-1, 1) if per_channel else step.reshape(1)


# -- the quantizer -------------------------------------------------------------------------
class LSQQuantizer(nn.Module):
    """Fake quantization with a learned step (LSQ).

    ``signed=True`` gives the symmetric weight range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``,
    ``signed=False`` the unsigned ``[0, 2^b - 1]``; ``signed=None`` picks on the first batch:
    unsigned when it has no negative value, else ``[-2^(b-1), 2^(b-1) - 1]``. ``channels`` > 0
    learns one step per row (dim 0) of the input; the step is initialised on the first batch
    unless ``init`` is given.
    """

    def __init__(
        self,
        bits: int,
        signed: bool | None,
        channels: int = 0,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        P.qrange(bits, True)  # validates bits
        self.bits, self.signed, self.channels = bits, signed, channels
        shape = (channels, 1) if channels else (1,)
        self.step = nn.Parameter(torch.ones(shape))
        self.initialized = False
        self.step_given = init is not None
        self.qmin, self.qmax = 0, 0
        self.grad_factor = 1.0
        if signed is True:
            self.qmin, self.qmax = P.qrange(bits, symmetric=True)
        elif signed is False:
            self.qmin, self.qmax = 0, 2**bits - 1
        if init is not None:
            with torch.no_grad():
                self.step.copy_(init.reshape(shape).clamp(min=_MIN_STEP))

    @property
    def unsigned(self) -> bool:
        return self.qmin == 0

    def start(self, x: torch.Tensor) -> None:
        """Fix the range, the gradient scale and (unless given) the step from the first batch."""
        if self.signed is None:
            if bool((x >= 0).all()):
                self.qmin, self.qmax = 0, 2**self.bits - 1
            else:
                self.qmin, self.qmax = P.qrange(self.bits, symmetric=False)
        per_step = x[0].numel()  # per channel: one row; per tensor: one example
        self.grad_factor = 1.0 / math.sqrt(per_step * self.qmax)
        if not self.step_given:
            with torch.no_grad():
                self.step.copy_(lsq_init_step(x, self.qmax, self.channels > 0))
        self.initialized = True

    def current_step(self, dims: int) -> torch.Tensor:
        """The step, clamped positive, shaped to broadcast over a tensor of ``dims`` dims."""
        step = self.step.clamp(min=_MIN_STEP)
        return step.reshape(-1, *[1] * (dims - 1)) if self.channels else step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.start(x.detach())
        step = grad_scale(self.current_step(x.dim()), self.grad_factor)
        return lsq_quantize(x, step, self.qmin, self.qmax)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (fp32) with the current step."""
        step = self.current_step(x.dim()).detach()
        return torch.round(torch.clamp(x.detach() / step, self.qmin, self.qmax))

    def extra_repr(self) -> str:
        kind = "per_channel" if self.channels else "per_tensor"
        return f"bits={self.bits}, {kind}, range=[{self.qmin}, {self.qmax}]"


# -- training-time wrappers ----------------------------------------------------------------
class QATLayer(nn.Module):
    """A float layer whose weight and (optionally) input are fake-quantized with LSQ."""

    def __init__(
        self, layer: nn.Linear | nn.Conv2d, weight_bits: int, ternary: bool, act_bits: int | None
    ) -> None:
        super().__init__()
        self.layer = layer
        weight = layer.weight.detach()
        init = P.ternarize(weight)[1] if ternary else None  # (C, 1) TWN scale
        bits = 2 if ternary else weight_bits
        self.weight_quant = LSQQuantizer(bits, signed=True, channels=weight.shape[0], init=init)
        self.weight_quant.start(weight)  # the weight is its own first batch
        self.act_quant = None if act_bits is None else LSQQuantizer(act_bits, signed=None)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.layer.weight)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self.kernel(x, self.quantized_weight())

    def kernel(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class QATLinear(QATLayer):
    def kernel(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.layer.bias)


class QATConv2d(QATLayer):
    def kernel(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m = self.layer
        assert isinstance(m, nn.Conv2d)
        return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)  # type: ignore[arg-type]


QAT_WRAPPERS: dict[type[nn.Module], type[QATLayer]] = {nn.Linear: QATLinear, nn.Conv2d: QATConv2d}


def convert(wrapper: QATLayer) -> nn.Module:
    """The stored integer layer computing what ``wrapper`` computes (in eval mode)."""
    layer, wq, aq = wrapper.layer, wrapper.weight_quant, wrapper.act_quant
    quant: dict[str, Any] = {"bits": wq.bits, "symmetric": True, "per_channel": True}
    if aq is None:
        q: Any = empty_twin(layer, **quant)
    else:
        q = static_twin(layer, **quant, act_bits=aq.bits, act_symmetric=False)
        # unsigned [0, 2^b - 1] is the asymmetric range [-2^(b-1), 2^(b-1) - 1] shifted
        zero = -(2 ** (aq.bits - 1)) if aq.unsigned else 0
        q.set_activation_params(aq.current_step(1).detach(), torch.tensor(float(zero)))
    codes = wq.codes(layer.weight)  # weight's shape, in [-qmax, qmax]
    q.set_quantized(codes, wq.current_step(2).detach(), None)
    return q  # type: ignore[no-any-return]


# -- config and handler --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QATConfig(StageConfig):
    """Quantization-aware training (LSQ) of weights and inputs, then integer storage."""

    kind = "quantize"
    method = "qat"

    weight_bits: int = 4
    act_bits: int | None = 4
    weights: str = "affine"
    epochs: int = 5
    lr: float = 3e-4
    batch_limit: int | None = None

    def validate(self) -> None:
        super().validate()
        if not MIN_BITS <= self.weight_bits <= MAX_BITS:
            self.fail("weight_bits", f"{MIN_BITS}..{MAX_BITS}")
        if self.act_bits is not None and not MIN_BITS <= self.act_bits <= MAX_BITS:
            self.fail("act_bits", f"{MIN_BITS}..{MAX_BITS}, or null for float activations")
        if self.weights not in WEIGHT_MODES:
            self.fail("weights", ", ".join(WEIGHT_MODES))
        if self.weights == "ternary" and self.weight_bits != 2:
            self.fail("weight_bits", "2 when weights is ternary (codes -1, 0, 1 take 2 bits)")
        if self.epochs < 1:
            self.fail("epochs", "an integer >= 1")
        if not (0.0 < self.lr < math.inf):
            self.fail("lr", "a finite number > 0")
        if self.batch_limit is not None and self.batch_limit < 1:
            self.fail("batch_limit", "an integer >= 1, or null for every batch")

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        """ConfigError before any work naming a selected layer with no quantized twin."""
        check_convertible(model, names, self.method)


def training_batches(ctx: Context, limit: int | None) -> list[TrainBatch]:
    """The task's labelled batches (at most ``limit``), checked; DataError when there are none."""
    batches = ctx.task.train_data() if ctx.task is not None else None
    if not batches:
        raise DataError("qat needs labelled training data: pass a task that has train_data()")
    out = []
    for i, item in enumerate(batches[:limit]):
        where = f"qat train_data()[{i}]"
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise DataError(f"{where}: expected an (inputs, labels) pair")
        inputs, labels = check_batch(item[0], where), item[1]
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
            raise DataError(f"{where}: labels must be a tensor of class indices")
        out.append((inputs, labels))
    return out


def train(
    model: nn.Module,
    data: list[TrainBatch],
    epochs: int,
    lr: float,
    report: Callable[[str], None] | None = None,
) -> float:
    """Adam with cosine decay on cross-entropy over ``data`` (in a fixed shuffled order);
    returns the mean loss of the last epoch. Leaves the model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    steps = epochs * len(data)
    result = fit(
        params,
        shuffled(data, torch.Generator().manual_seed(0)),
        cross_entropy(model),
        epochs=epochs,
        optimizer=torch_optimizer(
            lambda ps: torch.optim.Adam(ps, lr=lr),
            lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
        ),
        model=model,
        report=report,
        name="qat",
    )
    return result.losses[-1] if result.losses else math.nan


def wrap_layers(model: nn.Module, names: list[str], config: QATConfig) -> None:
    """Swap each named Linear / Conv2d for its training-time wrapper."""
    ternary = config.weights == "ternary"

    def wrap(name: str, module: nn.Module) -> nn.Module:
        wrapper = QAT_WRAPPERS[type(module)]
        return wrapper(module, config.weight_bits, ternary, config.act_bits)  # type: ignore[arg-type]

    swap_modules(model, names, wrap)


def convert_layers(model: nn.Module, names: list[str]) -> None:
    """Swap each named wrapper for its stored integer layer."""
    for name in names:
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, QATLayer)
        if wrapper.act_quant is not None and not wrapper.act_quant.initialized:
            raise DataError(f"layer {name!r} saw no training input")
    with torch.no_grad():
        swap_modules(model, names, lambda name, w: convert(w))  # type: ignore[arg-type]


@register(QATConfig, types=tuple(QAT_WRAPPERS))
def apply_qat(model: nn.Module, config: QATConfig, ctx: Context) -> nn.Module:
    data = training_batches(ctx, config.batch_limit)
    config.check(model, ctx.names)
    with torch.inference_mode(False), torch.enable_grad():
        wrap_layers(model, ctx.names, config)
        batches = [(writable(x), y.clone()) for x, y in data]
        loss = train(model, batches, config.epochs, config.lr, ctx.report)
    ctx.report(f"qat: trained {len(ctx.names)} layers, final loss {loss:.4f}")
    convert_layers(model, ctx.names)
    return model.eval()
