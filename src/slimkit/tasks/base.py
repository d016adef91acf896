"""The Task protocol: a model, its data and its metric, in one object."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.data import Batch
from slimkit.errors import ConfigError

STUDENT_INITS = ("teacher", "random")


class Task(abc.ABC):
    """A model + data + metric. Subclasses set the class variables and implement the methods.

    - ``model()`` returns a fresh fp32 model in eval mode (trained or pretrained);
    - ``evaluate(model)`` returns the task metrics, ``primary_metric`` among them;
    - ``robustness(model)`` returns the primary metric under input noise, one key per noise;
    - ``source()`` is what an artifact's manifest records so ``get(**source)`` rebuilds it.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    modality: ClassVar[str]  # "image" or "text"
    default_batch: ClassVar[int]  # latency batch size

    @abc.abstractmethod
    def model(self) -> nn.Module: ...

    @abc.abstractmethod
    def calibration_data(self) -> list[Batch]: ...

    def train_data(self) -> list[tuple[Batch, torch.Tensor]] | None:
        """(inputs, targets) batches where the task has labels, else None."""
        return None

    @abc.abstractmethod
    def example_inputs(self) -> Batch:
        """One example (batch 1) at the latency shape: used to count MACs and to trace."""

    @abc.abstractmethod
    def latency_inputs(self, batch: int | None = None) -> Batch:
        """A batch for timing, ``default_batch`` examples unless ``batch`` is given."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    @abc.abstractmethod
    def robustness(self, model: nn.Module) -> dict[str, float]: ...

    def source(self) -> dict[str, Any]:
        return {"task": self.name}

    def student(
        self, width: float = 1.0, depth: float = 1.0, init: str = "teacher", seed: int = 0
    ) -> nn.Module:
        """A smaller model with the task model's inputs and output shape, in eval mode:
        ``width`` scales the hidden widths and ``depth`` the number of layers (each in
        (0, 1]); ``init`` ``teacher`` starts from the task model's weights where the
        architecture allows, ``random`` from a seeded random initialisation."""
        raise ConfigError(f"task {self.name!r} defines no student architecture")

    def latency_description(self, batch: int | None = None) -> str:
        return f"batch {batch or self.default_batch}"


def check_student(task: str, width: float, depth: float, init: str) -> None:
    """ConfigError naming the argument when a student option is out of range."""
    for name, value in (("width", width), ("depth", depth)):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and 0.0 < value <= 1.0):
            raise ConfigError(
                f"task {task!r}: student {name} {value!r} is out of range; allowed: a number "
                "in (0, 1]"
            )
    if init not in STUDENT_INITS:
        raise ConfigError(
            f"task {task!r}: student init {init!r} is unknown; allowed: {', '.join(STUDENT_INITS)}"
        )
