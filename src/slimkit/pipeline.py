"""Runs a recipe over a model: checks first, then each stage's handler in order."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimkit import registry
from slimkit.compressed import CompressedModule
from slimkit.config import StageConfig
from slimkit.data import Batch
from slimkit.errors import DataError, ModelError, SelectionError
from slimkit.recipe import Recipe
from slimkit.select import module_types, select, select_names

if TYPE_CHECKING:
    from slimkit.tasks.base import Task

Progress = Callable[[str], None]


@dataclasses.dataclass
class Context:
    """What a handler may use besides the model and its config."""

    names: list[str]  # modules selected for this stage
    data: list[Batch] | None = None
    task: Task | None = None
    progress: Progress | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    #: the model as it entered the recipe (an eval-mode copy without gradients), when a stage
    #: of the recipe asks for it (``needs_original`` on its config, e.g. distillation from it)
    original: nn.Module | None = None

    def need_data(self, what: str) -> list[Batch]:
        """Calibration batches, or a DataError before any work when there are none."""
        if self.data is None and self.task is not None:
            self.data = self.task.calibration_data()
        if not self.data:
            raise DataError(f"{what} needs calibration data: pass data= or a task")
        return self.data

    def report(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


@dataclasses.dataclass
class StageTiming:
    kind: str
    method: str
    seconds: float


def check_finite(model: nn.Module) -> None:
    """ModelError naming the first layer whose parameters or buffers hold NaN or Inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            layer, _, tensor = name.rpartition(".")
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ModelError(f"layer {layer or '<root>'!r} has {bad} in its {tensor}")


class _Swapped:
    """Stands for the type of a module an earlier stage replaced (in ``precheck``)."""


def precheck(model: nn.Module, recipe: Recipe) -> None:
    """Everything that can be checked before work: finite weights, and every stage's patterns
    matching layers of its types, looking ahead past the layers earlier stages replace."""
    check_finite(model)
    named: dict[str, type] = module_types(model)
    for i, stage in enumerate(recipe.stages):
        if not isinstance(stage, StageConfig):
            continue
        types: tuple[type, ...] = registry.module_types(stage)
        if any(issubclass(t, CompressedModule) for t in types):
            types = (*types, _Swapped)  # a layer an earlier stage replaced may be one of them
        try:
            chosen = select_names(named, stage.targets, stage.ignore, types)
        except SelectionError as e:
            raise SelectionError(f"recipe {recipe.name!r} stages[{i}].{stage.kind}: {e}") from None
        named.update(dict.fromkeys(chosen, _Swapped))


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
) -> tuple[nn.Module, list[StageTiming]]:
    """Apply every stage of ``recipe`` to ``model`` (in place) and return it with timings."""
    precheck(model, recipe)
    original = frozen_copy(model) if needs_original(recipe) else None
    timings = []
    for i, stage in enumerate(recipe.stages):
        start = time.perf_counter()
        names: list[str] = []
        if isinstance(stage, StageConfig):
            try:
                names = select(model, stage.targets, stage.ignore, registry.module_types(stage))
            except SelectionError as e:
                raise SelectionError(
                    f"recipe {recipe.name!r} stages[{i}].{stage.kind}: {e}"
                ) from None
        ctx = Context(names=names, data=data, task=task, progress=progress, original=original)
        ctx.report(f"stage {i + 1}/{len(recipe.stages)}: {stage.kind} {stage.method}")
        with torch.no_grad():
            model = registry.handler_for(stage)(model, stage, ctx)
        data = ctx.data
        timings.append(StageTiming(stage.kind, stage.method, time.perf_counter() - start))
    return model, timings


def info(model: nn.Module) -> dict[str, Any]:
    """What slimkit recorded on ``model`` (recipe, source); empty for a plain model."""
    return dict(getattr(model, "_slimkit_info", {}) or {})


def set_info(model: nn.Module, **values: Any) -> None:
    merged = {**info(model), **{k: v for k, v in values.items() if v is not None}}
    object.__setattr__(model, "_slimkit_info", merged)
