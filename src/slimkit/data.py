"""Model inputs: a Tensor, a tuple of Tensors, or a dict of keyword arguments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimkit.errors import DataError

Batch = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def call(model: nn.Module, inputs: Batch) -> Any:
    """Run ``model`` on one batch of inputs of any of the three accepted forms."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (a Tensor, a tuple's first, or a HF output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "last_hidden_state"):
        for key in ("last_hidden_state", "logits"):
            value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
            if isinstance(value, torch.Tensor):
                return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a tensor in a model output of type {type(output).__name__}")


def check_batch(batch: Any, where: str) -> Batch:
    """Raise DataError unless ``batch`` is one of the three accepted input forms."""
    tensors = (
        [batch]
        if isinstance(batch, torch.Tensor)
        else list(batch)
        if isinstance(batch, tuple)
        else list(batch.values())
        if isinstance(batch, dict)
        else []
    )
    ok = bool(tensors) and all(isinstance(t, torch.Tensor) for t in tensors)
    if not ok:
        raise DataError(
            f"{where}: expected a Tensor, a tuple of Tensors or a dict of Tensors, "
            f"got {type(batch).__name__}"
        )
    return batch  # type: ignore[return-value]


def as_batches(data: Iterable[Any] | None, where: str = "data") -> list[Batch] | None:
    """Materialise calibration data into a list of checked batches (None stays None)."""
    if data is None:
        return None
    if isinstance(data, torch.Tensor | dict):
        data = [data]
    batches = [check_batch(b, f"{where}[{i}]") for i, b in enumerate(data)]
    if not batches:
        raise DataError(f"{where}: is empty; give at least one batch of model inputs")
    return batches


def writable(batch: Batch) -> Batch:
    """A copy usable by autograd (data made under inference mode cannot be)."""
    if isinstance(batch, dict):
        return {k: v.clone() for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return tuple(t.clone() for t in batch)
    return batch.clone()
