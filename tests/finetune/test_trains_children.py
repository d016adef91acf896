"""Compressed layers whose children are plain float layers train in place; others stay frozen."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from slimkit.compressed import CompressedModule
from slimkit.train.finetune import finetune, trainable
from tests.prune.toys import ToyTask, net


class Factored(CompressedModule):
    """fc1 of the toy Net as two plain Linear children."""

    trains_children: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 4, bias=False), nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class Frozen(Factored):
    trains_children: ClassVar[bool] = False


@pytest.mark.parametrize(("layer", "trains"), [(Factored, True), (Frozen, False)])
def test_children_train_only_when_the_layer_says_so(layer: type[Factored], trains: bool) -> None:
    model = net()
    model.fc1 = layer()
    found = {id(p) for p in trainable(model).params}
    children = [model.fc1.first.weight, model.fc1.second.weight, model.fc1.second.bias]
    assert all((id(p) in found) == trains for p in children)
    before = [p.detach().clone() for p in children]
    finetune(model, ToyTask().batches, epochs=2, lr=0.01)
    changed = [not torch.equal(b, p) for b, p in zip(before, children, strict=True)]
    assert all(changed) if trains else not any(changed)
