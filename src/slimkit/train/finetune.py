"""Supervised fine-tuning of a (compressed) model on the task's labelled training data.

The ``finetune`` stage minimises the cross-entropy of the model's first output tensor over
the task's ``train_data()`` batches with Adam, and trains

- every float ``nn.Parameter`` of plain modules (Linear, Conv2d, norms, embeddings, ...);
- sparse layers (``SparseLinear`` / ``SparseConv2d``): their kept values only (and bias); the
  values are a parameter while training and the dense weight is rebuilt from values + mask at
  every step, so pruned weights stay exactly zero and the mask never changes;
- k-means layers (``KMeansLinear`` / ``KMeansConv2d``): their codebooks (and bias), the
  indices fixed;
- compressed layers made of plain float layers (``trains_children``: factorized and
  depthwise-separable layers): those layers' parameters.

Every other compressed layer stays frozen with everything it holds, its float bias and scales
included: the integer-code layers (``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding``,
``DynamicQuantLinear``, ``StaticQuantLinear`` / ``StaticQuantConv2d``) and ``HuffmanCoded``
(with the layer it wraps). Afterwards every layer stores the same form as before, with the
trained values. The model trains in train mode (dropout on, normalisation statistics updated),
in an order shuffled by ``seed`` and with the random state seeded by it, and is returned in
eval mode. Deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.calib.capture import TrainBatch, labelled_batches
from slimkit.compressed import CompressedModule
from slimkit.config import Config
from slimkit.context import Context
from slimkit.data import call, first_tensor, writable
from slimkit.layers.codebook import KMeansWeight, trainable_codebooks
from slimkit.layers.sparse import SparseConv2d, SparseLinear, trainable_values
from slimkit.registry import register
from slimkit.train.fit import Callback, fit, shuffled
from slimkit.train.optim import adam, only_grad

#: compressed layers whose stored float weights can be trained in place
SPARSE_LAYERS = (SparseLinear, SparseConv2d)
TRAINABLE_STORAGE = (*SPARSE_LAYERS, KMeansWeight)

#: (weight, keep-mask) pairs whose masked-out entries are held at zero while training
WeightMasks = Sequence[tuple[torch.Tensor, torch.Tensor]]


class OptimizerName(str, enum.Enum):
    ADAM = "adam"


class LRSchedule(str, enum.Enum):
    CONSTANT, COSINE = "constant", "cosine"


def lr_at(lr: float, step: int, total: int, schedule: LRSchedule | str) -> float:
    """The learning rate of update ``step`` (0-based) of ``total``: ``lr`` throughout
    (constant) or ``lr * (1 + cos(pi * step / total)) / 2`` (cosine: from ``lr`` towards 0)."""
    if LRSchedule(schedule) is LRSchedule.CONSTANT or total <= 0:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(Config):
    """Fine-tune the whole model for ``epochs`` on the task's labelled data (cross-entropy,
    Adam at ``lr``, held constant or decayed to 0 on a cosine over all the updates with
    ``lr_schedule: cosine``), over its first ``batch_limit`` batches (null: all), shuffled by
    ``seed``."""

    kind = "finetune"
    method = "supervised"

    epochs: int = 3
    lr: float = 1e-4
    optimizer: OptimizerName = OptimizerName.ADAM
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    batch_limit: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            self.fail("epochs", "an integer >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            self.fail("lr", "a positive finite number")
        if self.batch_limit is not None and self.batch_limit < 1:
            self.fail("batch_limit", "an integer >= 1, or null for every batch")
        if self.seed < 0:
            self.fail("seed", "an integer >= 0")


# -- what trains -------------------------------------------------------------------------
@dataclasses.dataclass
class Trainable:
    """The float parameters of plain modules and trainable compressed layers, and the
    compressed layers whose stored values train."""

    params: list[nn.Parameter]
    sparse: list[SparseLinear | SparseConv2d]
    kmeans: list[KMeansWeight]


def trainable(model: nn.Module) -> Trainable:
    """What ``finetune`` trains in ``model``: compressed layers other than sparse and k-means
    ones are skipped with all their submodules; each module and parameter appears once."""
    out = Trainable([], [], [])
    params: dict[int, nn.Parameter] = {}
    for module in _unfrozen_modules(model, set()):
        if isinstance(module, SPARSE_LAYERS):
            out.sparse.append(module)
        elif isinstance(module, KMeansWeight):
            out.kmeans.append(module)
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                params.setdefault(id(p), p)
    out.params = list(params.values())
    return out


def _unfrozen_modules(module: nn.Module, visited: set[int]) -> Iterator[nn.Module]:
    """``module`` and its submodules, each once, leaving out frozen compressed layers and
    everything under them."""
    if id(module) in visited:
        return
    visited.add(id(module))
    if (
        isinstance(module, CompressedModule)
        and not isinstance(module, TRAINABLE_STORAGE)
        and not module.trains_children
    ):
        return
    yield module
    for child in module.children():
        yield from _unfrozen_modules(child, visited)


@contextlib.contextmanager
def training(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Inside, the tensors ``finetune`` trains as parameters requiring gradients (every other
    parameter without); the sparse values and codebooks are buffers again after, all flags
    restored."""
    found = trainable(model)
    with (
        trainable_values(found.sparse) as values,
        trainable_codebooks(found.kmeans) as codebooks,
    ):
        params = [*found.params, *values, *codebooks]
        with only_grad(model, params):
            yield params


# -- the loop ----------------------------------------------------------------------------
def cross_entropy(model: nn.Module) -> Callable[[TrainBatch], torch.Tensor]:
    """The loss of a batch of (inputs, class labels): the cross-entropy of ``model``'s first
    output tensor."""

    def loss(batch: TrainBatch) -> torch.Tensor:
        inputs, labels = batch
        logits = first_tensor(call(model, inputs))  # (B, classes)
        return F.cross_entropy(logits, labels)

    return loss


class KeepMasks(Callback):
    """After every update each weight is multiplied by its keep-mask (masked-out entries
    stay exactly zero)."""

    def __init__(self, masks: WeightMasks) -> None:
        self.masks = masks

    @torch.no_grad()
    def step_end(self, steps: int, loss: float) -> None:
        for weight, keep in self.masks:
            weight.mul_(keep)


def finetune(
    model: nn.Module,
    batches: Sequence[TrainBatch],
    epochs: int,
    lr: float,
    seed: int = 0,
    masks: WeightMasks = (),
    report: Callable[[str], None] | None = None,
    lr_schedule: LRSchedule | str = LRSchedule.CONSTANT,
) -> list[float]:
    """Train ``model`` (see the module doc) with Adam on the cross-entropy of its first output
    over ``batches`` of (inputs, class labels), the rate set by ``lr_schedule`` (:func:`lr_at`)
    before every update; return each epoch's mean loss.

    After every update each weight of ``masks`` is multiplied by its keep-mask, so its
    masked-out entries stay exactly zero. No ``.grad`` is left on any tensor; the model is
    left in eval mode. ModelError when the loss becomes NaN or Inf (before that update)."""
    data = [(writable(x), y.clone()) for x, y in batches]
    order = torch.Generator().manual_seed(seed)
    updates = epochs * len(data)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.random.fork_rng(devices=[]))
        params = stack.enter_context(training(model))
        torch.manual_seed(seed)
        result = fit(
            params,
            shuffled(data, order),
            cross_entropy(model),
            epochs=epochs,
            optimizer=adam(lr),
            schedule=lambda step: lr_at(lr, step, updates, lr_schedule),
            model=model,
            callbacks=[KeepMasks(masks)] if masks else (),
            report=report,
            name="finetune",
        )
    model.eval()
    return result.losses


@register(FinetuneConfig)
def apply_finetune(model: nn.Module, config: FinetuneConfig, ctx: Context) -> nn.Module:
    batches = labelled_batches(model, ctx, "finetune")[: config.batch_limit]
    losses = finetune(
        model,
        batches,
        config.epochs,
        config.lr,
        config.seed,
        report=ctx.report,
        lr_schedule=config.lr_schedule,
    )
    ctx.report(f"finetune: {config.epochs} epochs on {len(batches)} batches, loss {losses[-1]:.4f}")
    return model.eval()
