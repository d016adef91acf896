"""What a stage handler gets besides the model and its config, and what it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


#: writes one report file of a stage to the path given
FileWriter = Callable[[Path], None]


@dataclasses.dataclass
class StageResult:
    """What a stage made: the model, and optionally

    - ``record``: JSON facts about the stage worth keeping with the artifact (the manifest's
      ``stages`` entry for it);
    - ``source``: keys the artifact's ``source`` must add so that loading rebuilds the
      returned model's architecture (a distilled student's options);
    - ``files``: report files by name, each with the function that writes it (the search
      Pareto plot); whoever writes the artifact writes them beside it.

    A handler may return the bare model when it has nothing else to say."""

    model: nn.Module
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, FileWriter] = dataclasses.field(default_factory=dict)


def model_of(made: nn.Module | StageResult) -> nn.Module:
    """The model a handler returned, bare or in its ``StageResult``."""
    return made.model if isinstance(made, StageResult) else made
