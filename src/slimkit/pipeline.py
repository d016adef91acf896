"""Runs a recipe over a model: checks first, then each stage's handler in order."""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimkit import registry
from slimkit.compressed import CompressedModule
from slimkit.config import StageConfig
from slimkit.context import Context, FileWriter, Progress, StageResult
from slimkit.data import Batch, call
from slimkit.errors import ConfigError, DataError, SelectionError
from slimkit.model_info import (
    check_finite,
    check_float32,
    eval_mode,
    restore_training,
    training_flags,
)
from slimkit.recipe import Recipe
from slimkit.select import module_types, select, select_names, tied_weights

if TYPE_CHECKING:
    from slimkit.tasks.base import Task


@dataclasses.dataclass
class StageTiming:
    kind: str
    method: str
    seconds: float


@dataclasses.dataclass
class Run:
    """The outcome of :func:`run`: the model, each stage's timing and result."""

    model: nn.Module
    timings: list[StageTiming]
    results: list[StageResult]

    def records(self) -> list[dict[str, Any]]:
        """One JSON entry per stage: its kind, method and record (the manifest's
        ``stages``)."""
        return [
            {"kind": t.kind, "method": t.method, "record": r.record}
            for t, r in zip(self.timings, self.results, strict=True)
        ]

    def source(self) -> dict[str, Any]:
        """What the stages add to the model's source (later stages win)."""
        out: dict[str, Any] = {}
        for r in self.results:
            out.update(r.source)
        return out

    def files(self) -> dict[str, FileWriter]:
        out: dict[str, FileWriter] = {}
        for r in self.results:
            out.update(r.files)
        return out


# -- calibration data ------------------------------------------------------------------------
def _dims(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _shape(batch: Batch) -> str:
    """A batch's tensor shapes: ``(2, 8)``, ``((2, 8), (2,))`` or ``{ids: (2, 8), ...}``."""
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {_dims(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, tuple | list):
        return "(" + ", ".join(_dims(t) for t in batch) + ")"
    return _dims(batch)


def _form(batch: Batch) -> tuple[Any, ...]:
    """What two batches of one data set share: their kind, keys and tensor ranks."""

    def rank(t: Any) -> int | None:
        return t.dim() if isinstance(t, torch.Tensor) else None

    if isinstance(batch, dict):
        return ("dict", tuple(sorted((k, rank(v)) for k, v in batch.items())))
    if isinstance(batch, tuple | list):
        return ("tuple", tuple(rank(t) for t in batch))
    return ("tensor", rank(batch))


def check_data(model: nn.Module, data: Sequence[Batch]) -> None:
    """DataError naming the batch, its shape and what failed, before any work: every batch
    has the first one's form (keys, number of tensors, their ranks), and the model runs on
    the first (in eval mode, without gradients; its flags restored after)."""
    first = data[0]
    for i, batch in enumerate(data[1:], 1):
        if _form(batch) != _form(first):
            raise DataError(
                f"data[{i}] of shape {_shape(batch)}: not of the form of data[0] "
                f"{_shape(first)}; every batch needs the same inputs with the same dimensions"
            )
    with eval_mode(model), torch.no_grad():
        try:
            call(model, first)
        except Exception as e:
            why = (str(e).strip().splitlines() or [""])[0]
            raise DataError(
                f"data[0] of shape {_shape(first)}: the model fails on it: "
                f"{type(e).__name__}: {why}"
            ) from None


# -- before any work -------------------------------------------------------------------------
class _Swapped:
    """Stands for the type of a module an earlier stage replaced (in ``precheck``)."""


def precheck(model: nn.Module, recipe: Recipe, data: Sequence[Batch] | None = None) -> None:
    """Everything that can be checked before work: float32 and finite weights; ``data``
    (when given) fitting the model; every stage's patterns matching layers of its types,
    looking ahead past the layers earlier stages replace; and every stage's options against
    the layers it selects (``StageConfig.check``: group sizes dividing input sizes, layer
    types a method can convert, ...). Layers sharing a weight with another module are left
    out (``run`` leaves them uncompressed)."""
    check_float32(model)
    check_finite(model)
    if data:
        check_data(model, data)
    named: dict[str, type] = module_types(model)
    tied = tied_weights(model)
    for i, stage in enumerate(recipe.stages):
        if not isinstance(stage, StageConfig):
            continue
        where = f"recipe {recipe.name!r} stages[{i}].{stage.kind}"
        types: tuple[type, ...] = registry.target_types(stage)
        if any(issubclass(t, CompressedModule) for t in types):
            types = (*types, _Swapped)  # a layer an earlier stage replaced may be one of them
        try:
            chosen = select_names(named, stage.targets, stage.ignore, types)
        except SelectionError as e:
            raise SelectionError(f"{where}: {e}") from None
        chosen = [n for n in chosen if n not in tied]
        present = [n for n in chosen if named[n] is not _Swapped]
        try:
            stage.check(model, present)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        named.update(dict.fromkeys(chosen, _Swapped))


def untied(model: nn.Module, names: list[str], stage: StageConfig) -> list[str]:
    """``names`` without the layers whose weight another module shares (an Embedding and a
    tied output Linear): a warning names each such layer and the one it shares with, and
    the stage leaves it uncompressed, float and still tied."""
    tied = tied_weights(model)
    for name in names:
        if name in tied:
            tensor, other = tied[name]
            warnings.warn(
                f"layer {name!r} shares its {tensor} with {other or '<root>'!r}; "
                f"{stage.kind}.{stage.method} leaves it uncompressed (float, tied)",
                stacklevel=3,
            )
    return [n for n in names if n not in tied]


def needs_original(recipe: Recipe) -> bool:
    """Whether a stage of ``recipe`` uses the model as it was before the recipe."""
    return any(bool(getattr(stage, "needs_original", False)) for stage in recipe.stages)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode, no parameter requiring gradients."""
    with torch.no_grad():
        original = copy.deepcopy(model)
    for p in original.parameters():
        p.requires_grad_(False)
    return original.eval()


def run(
    model: nn.Module,
    recipe: Recipe,
    data: list[Batch] | None = None,
    task: Task | None = None,
    progress: Progress | None = None,
) -> Run:
    """Apply every stage of ``recipe`` to ``model`` (in place); return it with each stage's
    timing and result.

    Every stage starts with the model in eval mode (calibration never changes the model it
    measures: no dropout, BatchNorm statistics untouched; a training stage switches to
    train mode itself); the model comes back with each submodule's ``training`` flag as the
    caller left it, a layer swapped in taking its parent's."""
    precheck(model, recipe, data)
    flags = training_flags(model)
    original = frozen_copy(model) if needs_original(recipe) else None
    timings = []
    results = []
    try:
        for i, stage in enumerate(recipe.stages):
            start = time.perf_counter()
            names = _selected(model, recipe, i)
            ctx = Context(names=names, data=data, task=task, progress=progress, original=original)
            ctx.report(f"stage {i + 1}/{len(recipe.stages)}: {stage.kind} {stage.method}")
            model.eval()
            with torch.no_grad():
                made = registry.handler_for(stage)(model, stage, ctx)
            result = made if isinstance(made, StageResult) else StageResult(made)
            model = result.model
            results.append(result)
            data = ctx.data
            timings.append(StageTiming(stage.kind, stage.method, time.perf_counter() - start))
    finally:
        restore_training(model, flags)
    return Run(model, timings, results)


def _selected(model: nn.Module, recipe: Recipe, i: int) -> list[str]:
    """The layers stage ``i`` of ``recipe`` works on (none for a stage without targets),
    layers sharing their weight with another module left out (with a warning)."""
    stage = recipe.stages[i]
    if not isinstance(stage, StageConfig):
        return []
    try:
        names = select(model, stage.targets, stage.ignore, registry.target_types(stage))
    except SelectionError as e:
        raise SelectionError(f"recipe {recipe.name!r} stages[{i}].{stage.kind}: {e}") from None
    return untied(model, names, stage)
