"""K-means weight sharing (Deep Compression): a few shared float values per layer.

Each selected layer's weights are clustered into ``2**bits`` groups by Lloyd's algorithm in one
dimension; every weight is then replaced by its cluster's centroid. A layer stores

- ``codebook`` (fp32, (2**bits,)): the shared values;
- ``indices`` (uint8, (ceil(n * bits / 8),)): the codebook index of each of the ``n`` weights,
  bit-packed with :mod:`slimkit.formats.packing`,

so the artifact's size shows the bits. The forward gathers the codebook into the dense weight
and runs the float kernel; the unpacked indices are cached (int64, refreshed when the packed
buffer changes).

With ``finetune_epochs > 0`` the codebooks are then trained on the task's labelled data while
the indices stay fixed: the weight is computed as ``codebook[indices]``, so the gradient of a
shared value is the sum of the gradients of the weights that use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from slimkit.calib.capture import TrainBatch, labelled_batches
from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.formats.codebook import MAX_BITS, MIN_BITS
from slimkit.layers.codebook import (
    KMEANS_SWAPS,
    KMeansWeight,
    sparse_kmeans_twin,
    trainable_codebooks,
)
from slimkit.layers.shapes import check_twins
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.registry import register
from slimkit.select import swap_modules
from slimkit.train.finetune import cross_entropy
from slimkit.train.fit import fit
from slimkit.train.optim import adam


# -- codebook fine-tuning ---------------------------------------------------------------------
@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Every current parameter of ``model`` without gradients, flags restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def finetune_codebooks(
    model: nn.Module,
    layers: Sequence[KMeansWeight],
    batches: Sequence[TrainBatch],
    epochs: int,
    lr: float,
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Train only the codebooks of ``layers`` with Adam on the cross-entropy of ``model``'s
    logits over ``batches`` of (inputs, class labels); return each epoch's mean loss.

    The model stays in eval mode (dropout off, normalisation statistics untouched) so that the
    codebooks are the only tensors that change; the indices are fixed. No ``.grad`` is left
    on any tensor.
    """
    model.eval()
    with _frozen(model), trainable_codebooks(layers) as codebooks, torch.enable_grad():
        result = fit(
            codebooks,
            batches,
            cross_entropy(model),
            epochs=epochs,
            optimizer=adam(lr),
            model=model,
            train_mode=False,
            report=progress,
            name="codebook fine-tuning",
            check_finite=False,
        )
    model.eval()
    return result.losses


# -- config and handler -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KMeansConfig(StageConfig):
    """Weight sharing: ``2**bits`` k-means centroids per layer, indices packed; the codebooks
    optionally fine-tuned for ``finetune_epochs`` on the task's labelled data (Adam, ``lr``)."""

    kind = "quantize"
    method = "kmeans"

    bits: int = 4
    iters: int = 30
    finetune_epochs: int = 0
    lr: float = 1e-4

    def validate(self) -> None:
        super().validate()
        if not MIN_BITS <= self.bits <= MAX_BITS:
            self.fail("bits", f"{MIN_BITS}..{MAX_BITS}")
        if self.iters < 1:
            self.fail("iters", "a positive integer (Lloyd rounds at most)")
        if self.finetune_epochs < 0:
            self.fail("finetune_epochs", "an integer >= 0 (0 = no codebook fine-tuning)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            self.fail("lr", "a positive finite number")

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        check_kmeans_convertible(model, names)


def check_kmeans_convertible(model: nn.Module, names: Sequence[str]) -> None:
    """ConfigError naming the first selected layer that has no k-means twin of its form
    (every sparse layer has a sparse k-means twin)."""
    check_twins(model, names, KMEANS_SWAPS, "kmeans", "quantized", (SparseLinear, SparseConv2d))


def training_batches(model: nn.Module, ctx: Context, epochs: int) -> list[TrainBatch]:
    """The task's (inputs, labels) batches for codebook fine-tuning, checked before any work."""
    return labelled_batches(model, ctx, f"kmeans codebook fine-tuning (finetune_epochs={epochs})")


@register(KMeansConfig, types=(*KMEANS_SWAPS, SparseLinear, SparseConv2d))
def apply_kmeans(model: nn.Module, config: KMeansConfig, ctx: Context) -> nn.Module:
    config.check(model, ctx.names)
    epochs = config.finetune_epochs
    batches = training_batches(model, ctx, epochs) if epochs > 0 else []

    def make(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, SparseLinear | SparseConv2d):
            return sparse_kmeans_twin(module, config.bits, config.iters)
        q: KMeansWeight = KMEANS_SWAPS[type(module)].empty_like(module, bits=config.bits)
        q.set_weight(module.weight, config.iters)  # type: ignore[arg-type]
        return q

    swap_modules(model, ctx.names, make)
    if batches:
        unique = {id(m): m for m in (model.get_submodule(n) for n in ctx.names)}
        layers = [m for m in unique.values() if isinstance(m, KMeansWeight)]
        finetune_codebooks(model, layers, batches, epochs, config.lr, ctx.report)
    return model
