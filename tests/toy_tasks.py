"""The shared half of the tests' toy classification tasks: labelled data in ``x`` / ``y``."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.data import Batch
from slimkit.tasks.base import Task


class LabelledToyTask(Task):
    """Top-1 accuracy over ``x`` (inputs) and ``y`` (labels), trained in batches of 32."""

    primary_metric = "accuracy"
    modality = "image"
    default_batch = 8
    x: torch.Tensor
    y: torch.Tensor

    def train_data(self) -> list[tuple[Batch, torch.Tensor]]:
        return [(self.x[i : i + 32], self.y[i : i + 32]) for i in range(0, len(self.x), 32)]

    def latency_inputs(self, batch: int | None = None) -> Batch:
        return self.x[: batch or self.default_batch]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            return {"accuracy": float((model(self.x).argmax(1) == self.y).float().mean())}

    def robustness(self, model: nn.Module) -> dict[str, float]:
        return {}
