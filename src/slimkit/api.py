"""The public verbs: compress, save, load, evaluate."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from slimkit import builtin, pipeline  # noqa: F401  (builtin: the techniques made known)
from slimkit.context import Progress
from slimkit.data import as_batches
from slimkit.io import artifact
from slimkit.model_info import set_info
from slimkit.recipe import Recipe, as_recipe

if TYPE_CHECKING:
    from slimkit.evaluate.result import Result
    from slimkit.tasks.base import Task


def _task(task: Task | str | None) -> Task | None:
    if isinstance(task, str):
        from slimkit import tasks

        return tasks.get(task)
    return task


def compress(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | os.PathLike[str],
    data: Iterable[Any] | None = None,
    task: Task | str | None = None,
    *,
    progress: Progress | None = None,
) -> nn.Module:
    """Apply ``recipe``'s stages to ``model`` (in place) and return the compressed model.

    ``data``: model inputs (Tensors, tuples of Tensors or dicts of keyword arguments) for
    calibration and tracing; defaults to the task's calibration data where a stage needs it.
    """
    return compress_run(model, recipe, data, task, progress=progress).model


def compress_run(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | os.PathLike[str],
    data: Iterable[Any] | None = None,
    task: Task | str | None = None,
    *,
    progress: Progress | None = None,
) -> pipeline.Run:
    """``compress``, returning every stage's timing and result too (the report files a
    stage made, for whoever writes the artifact)."""
    rec = as_recipe(recipe)
    the_task = _task(task)
    batches = as_batches(data)
    run = pipeline.run(model, rec, data=batches, task=the_task, progress=progress)
    set_info(
        run.model,
        recipe=rec.to_dict(),
        source=the_task.source() if the_task is not None else None,
        source_extra=run.source() or None,
        stages=run.records(),
    )
    return run


def save(model: nn.Module, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``model`` as an artifact directory (model.safetensors + slimkit.json)."""
    return artifact.save(model, path, overwrite=overwrite)


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model, verifying format and checksums; never unpickles."""
    return artifact.load(path, model=model)


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str = "onnx",
    example: Any = None,
    *,
    overwrite: bool = False,
    inputs: Any = None,
    runs: int = 5,
) -> Path:
    """Write ``model`` as a runtime's own model (``onnx``, ``openvino``, or ``auto``: the
    fastest faithful one, timed here on ``inputs`` over ``runs`` calls) into the directory
    ``path``, its weights kept in their compressed form; ``example``: one batch of inputs."""
    from slimkit.deploy import export as write

    return write(model, path, format, example, overwrite=overwrite, inputs=inputs, runs=runs)


def evaluate(model: nn.Module, task: Task | str, *, runs: int = 10) -> Result:
    """Task metrics, size on disk, params, MACs, latency, memory and robustness of ``model``."""
    from slimkit.evaluate.runner import evaluate_model

    the_task = _task(task)
    assert the_task is not None
    return evaluate_model(model, the_task, runs=runs)
