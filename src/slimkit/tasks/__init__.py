"""Built-in tasks by name: ``get(name, **kwargs)``, ``names()``, ``describe()``, ``from_source``.

Importing this package is light: the text tasks import ``transformers`` only when used.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from slimkit.errors import TaskError, did_you_mean
from slimkit.tasks.base import Task
from slimkit.tasks.causal import CausalLMTask, HFCausalTask, SmolLM2Topics
from slimkit.tasks.digits import DigitsLeNet, DigitsMLP
from slimkit.tasks.resnet import DigitsResNet
from slimkit.tasks.text import HFTask, MiniLMTopics, TextEncoderTask

__all__ = [
    "CausalLMTask",
    "DigitsLeNet",
    "DigitsMLP",
    "DigitsResNet",
    "HFCausalTask",
    "HFTask",
    "MiniLMTopics",
    "SmolLM2Topics",
    "Task",
    "TextEncoderTask",
    "describe",
    "from_source",
    "get",
    "model_from_source",
    "names",
]

#: the key of a task source that records a student architecture
STUDENT = "student"

_TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        DigitsLeNet,
        DigitsMLP,
        DigitsResNet,
        MiniLMTopics,
        HFTask,
        SmolLM2Topics,
        HFCausalTask,
    )
}


def names() -> list[str]:
    """The built-in task names, sorted."""
    return sorted(_TASKS)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in task, sorted by name."""
    return [(name, _TASKS[name].description) for name in names()]


def get(name: str, **kwargs: Any) -> Task:
    """A new task instance; ``kwargs`` go to its constructor (``hf``: model_dir=, data=)."""
    cls = _TASKS.get(name)
    if cls is None:
        raise TaskError(
            f"unknown task {name!r}{did_you_mean(str(name), names())}; "
            f"available: {', '.join(names())}"
        )
    _check_arguments(cls, kwargs)
    return cls(**kwargs)


def from_source(source: dict[str, Any]) -> Task:
    """Rebuild a task from what its ``source()`` returned, e.g. ``{"task": "digits-lenet"}``."""
    if not isinstance(source, dict) or not isinstance(source.get("task"), str):
        raise TaskError(f"not a task source (expected a mapping with a 'task' name): {source!r}")
    kwargs = {k: v for k, v in source.items() if k not in ("task", STUDENT)}
    return get(source["task"], **kwargs)


def model_from_source(source: dict[str, Any]) -> nn.Module:
    """The architecture a task source records: the task's model, or, when the source has a
    ``student`` entry (``{"width", "depth", ...}``, recorded by distillation into a student),
    ``task.student(...)`` randomly initialised (its tensors are then loaded)."""
    task = from_source(source)
    student = source.get(STUDENT)
    if student is None:
        return task.model()
    if not isinstance(student, dict):
        raise TaskError(f"a task source's 'student' must be a mapping, got {student!r}")
    return task.student(
        width=float(student.get("width", 1.0)),
        depth=float(student.get("depth", 1.0)),
        init="random",
        seed=int(student.get("seed", 0)),
    )


def _check_arguments(cls: type[Task], kwargs: dict[str, Any]) -> None:
    """Raise TaskError (not TypeError) when ``kwargs`` do not fit the task's constructor."""
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError:
        params = [
            p
            for p in inspect.signature(cls).parameters.values()
            if p.kind == p.KEYWORD_ONLY or p.kind == p.POSITIONAL_OR_KEYWORD
        ]
        wanted = ", ".join(p.name for p in params) or "no arguments"
        given = ", ".join(sorted(kwargs)) or "none"
        raise TaskError(f"task {cls.name!r} takes {wanted}; got {given}") from None
