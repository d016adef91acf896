"""Runs a recipe over a model: checks first, then each stage's handler in order."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimkit import registry
from slimkit.compressed import CompressedModule
from slimkit.config import StageConfig
from slimkit.data import Batch, call
from slimkit.errors import ConfigError, DataError, ModelError, SelectionError
from slimkit.recipe import Recipe
from slimkit.select import module_types, select, select_names, tied_weights

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


def check_float32(model: nn.Module) -> None:
    """ModelError naming the first floating-point parameter that is not float32."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            dtype = str(p.dtype).removeprefix("torch.")
            raise ModelError(
                f"model parameter {name!r} is {dtype}; slimkit compresses float32 models: "
                "call model.float() first"
            )


def check_finite(model: nn.Module) -> None:
    """ModelError naming the first layer whose parameters or buffers hold NaN or Inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            layer, _, tensor = name.rpartition(".")
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ModelError(f"layer {layer or '<root>'!r} has {bad} in its {tensor}")


# -- training flags --------------------------------------------------------------------------
def training_flags(model: nn.Module) -> dict[str, bool]:
    """The ``training`` flag of every submodule, by name."""
    return {name: m.training for name, m in model.named_modules()}


def restore_training(model: nn.Module, flags: dict[str, bool]) -> None:
    """Set each submodule's ``training`` flag back to ``flags[name]``; a module under a name
    ``flags`` does not know (a layer a stage swapped in, or its children) takes its parent's."""
    now: dict[str, bool] = {}
    for name, m in model.named_modules():  # parents come before their children
        parent = name.rpartition(".")[0]
        m.training = flags[name] if name in flags else now.get(parent, flags.get("", False))
        now[name] = m.training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode while open (no dropout, normalisation statistics untouched);
    every submodule's ``training`` flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


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
        types: tuple[type, ...] = registry.module_types(stage)
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
) -> tuple[nn.Module, list[StageTiming]]:
    """Apply every stage of ``recipe`` to ``model`` (in place) and return it with timings.

    Every stage starts with the model in eval mode (calibration never changes the model it
    measures: no dropout, BatchNorm statistics untouched; a training stage switches to
    train mode itself); the model comes back with each submodule's ``training`` flag as the
    caller left it, a layer swapped in taking its parent's."""
    precheck(model, recipe, data)
    flags = training_flags(model)
    original = frozen_copy(model) if needs_original(recipe) else None
    timings = []
    try:
        for i, stage in enumerate(recipe.stages):
            start = time.perf_counter()
            names = _selected(model, recipe, i)
            ctx = Context(names=names, data=data, task=task, progress=progress, original=original)
            ctx.report(f"stage {i + 1}/{len(recipe.stages)}: {stage.kind} {stage.method}")
            model.eval()
            with torch.no_grad():
                model = registry.handler_for(stage)(model, stage, ctx)
            data = ctx.data
            timings.append(StageTiming(stage.kind, stage.method, time.perf_counter() - start))
    finally:
        restore_training(model, flags)
    return model, timings


def _selected(model: nn.Module, recipe: Recipe, i: int) -> list[str]:
    """The layers stage ``i`` of ``recipe`` works on (none for a stage without targets),
    layers sharing their weight with another module left out (with a warning)."""
    stage = recipe.stages[i]
    if not isinstance(stage, StageConfig):
        return []
    try:
        names = select(model, stage.targets, stage.ignore, registry.module_types(stage))
    except SelectionError as e:
        raise SelectionError(f"recipe {recipe.name!r} stages[{i}].{stage.kind}: {e}") from None
    return untied(model, names, stage)


def info(model: nn.Module) -> dict[str, Any]:
    """What slimkit recorded on ``model`` (recipe, source); empty for a plain model."""
    return dict(getattr(model, "_slimkit_info", {}) or {})


def set_info(model: nn.Module, **values: Any) -> None:
    merged = {**info(model), **{k: v for k, v in values.items() if v is not None}}
    object.__setattr__(model, "_slimkit_info", merged)
