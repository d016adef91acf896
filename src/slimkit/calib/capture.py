"""Calibration passes: run the model over data and watch what enters selected layers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from slimkit.context import Context
from slimkit.data import Batch, call, first_tensor
from slimkit.errors import DataError

Watcher = Callable[[str, torch.Tensor], None]
TrainBatch = tuple[Batch, torch.Tensor]  # (inputs, class labels)


def check_finite_input(name: str, x: torch.Tensor) -> None:
    """DataError naming the layer when its calibration input holds NaN or Inf."""
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return  # a finite sum needs finite values (fast); an overflowing one is checked below
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise DataError(f"calibration activations entering layer {name!r} hold {bad}")


@contextlib.contextmanager
def watching(model: nn.Module, names: Sequence[str], watch: Watcher) -> Iterator[None]:
    """While open, every forward of a named module calls ``watch(name, input)`` first
    (after checking the input is finite)."""

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            check_finite_input(name, x)
            watch(name, x)

        return hook

    handles = [
        model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_batches(model: nn.Module, data: Sequence[Batch]) -> None:
    with torch.no_grad():
        for batch in data:
            call(model, batch)


def channel_rows(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The input as (N, C) rows of features: tokens for a Linear, pixels for a Conv2d."""
    if isinstance(module, nn.Conv2d) and x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (B*H*W, C)
    return x.reshape(-1, x.shape[-1])  # (tokens, features)


def input_absmax(
    model: nn.Module, names: Sequence[str], data: Sequence[Batch]
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| over the calibration data, for each named layer: (C,)."""
    stats: dict[str, torch.Tensor] = {}
    modules = {name: model.get_submodule(name) for name in names}

    def watch(name: str, x: torch.Tensor) -> None:
        amax = channel_rows(x, modules[name]).abs().amax(dim=0).float()  # (C,)
        stats[name] = torch.maximum(stats[name], amax) if name in stats else amax

    with watching(model, names, watch):
        run_batches(model, data)
    return stats


def labelled_batches(model: nn.Module, ctx: Context, what: str) -> list[TrainBatch]:
    """The task's (inputs, class labels) batches, checked against one forward of the first
    batch; DataError when there are none or they do not fit the model."""
    data = ctx.task.train_data() if ctx.task is not None else None
    if not data:
        source = "no task was given" if ctx.task is None else f"task {ctx.task.name!r} has none"
        raise DataError(f"{what} needs labelled training data (task train_data); {source}")
    batches = list(data)
    for i, item in enumerate(batches):
        ok = isinstance(item, tuple | list) and len(item) == 2
        if not ok or not isinstance(item[1], torch.Tensor) or item[1].is_floating_point():
            raise DataError(f"{what}: train_data()[{i}] is not an (inputs, class labels) pair")
    inputs, labels = batches[0]
    with torch.no_grad():
        logits = first_tensor(call(model, inputs))
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise DataError(
            f"{what}: logits of shape {tuple(logits.shape)} do not fit labels of shape "
            f"{tuple(labels.shape)}; need (B, classes) and (B,)"
        )
    return [(b[0], b[1]) for b in batches]
