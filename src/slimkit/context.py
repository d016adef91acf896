"""What a stage handler gets besides the model and its config."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimkit.data import Batch
from slimkit.errors import DataError

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
