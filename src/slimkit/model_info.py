"""Facts about a model that every floor may ask: what slimkit recorded on it, whether its
weights are float32 and finite, and its submodules' training flags."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimkit.errors import ModelError


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


# -- what slimkit recorded -------------------------------------------------------------------
def info(model: nn.Module) -> dict[str, Any]:
    """What slimkit recorded on ``model`` (recipe, source); empty for a plain model."""
    return dict(getattr(model, "_slimkit_info", {}) or {})


def set_info(model: nn.Module, **values: Any) -> None:
    merged = {**info(model), **{k: v for k, v in values.items() if v is not None}}
    object.__setattr__(model, "_slimkit_info", merged)


# -- what a layer is -------------------------------------------------------------------------
#: the head attributes of a BERT-like self-attention module
HEAD_ATTRS = ("num_attention_heads", "attention_head_size", "all_head_size")
#: its query / key / value Linear submodules
PROJECTIONS = ("query", "key", "value")


def is_attention(m: nn.Module) -> bool:
    """query / key / value Linear layers and int head attributes (any values)."""
    linears = all(isinstance(getattr(m, p, None), nn.Linear) for p in PROJECTIONS)
    return linears and all(isinstance(getattr(m, a, None), int) for a in HEAD_ATTRS)


def head_attrs(m: nn.Module) -> tuple[int, int, int]:
    """(num_attention_heads, attention_head_size, all_head_size) of an attention module."""
    n, d, total = (int(getattr(m, a)) for a in HEAD_ATTRS)
    return n, d, total
