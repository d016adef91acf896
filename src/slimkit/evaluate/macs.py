"""Multiply-accumulate count of one forward pass."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimkit.data import Batch, call


def count_macs(model: nn.Module, inputs: Batch) -> int:
    """MACs of ``model`` on ``inputs`` (half the flops torch's flop counter sees).

    Counts the ops the model actually executes: a layer that dequantizes its weights and
    runs the float kernel counts as many MACs as the dense layer.
    """
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call(model, inputs)
    return int(counter.get_total_flops()) // 2
