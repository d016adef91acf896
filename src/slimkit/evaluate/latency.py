"""Wall-clock latency of several models, timed alternately in one process."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.data import Batch, call


def time_alternating(
    models: Sequence[nn.Module],
    inputs: Batch,
    runs: int = 10,
    warmup: int = 2,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Time each model ``runs`` times on ``inputs``, alternating between the models.

    Each round calls every model once, the order rotating by one model per round, so drift
    in machine load or clock speed falls on all models alike. ``warmup`` untimed rounds come
    first. Returns, per model, ``{"median", "min", "max"}`` in ms plus the ``batch`` size,
    the number of torch CPU ``threads`` used and the number of timed ``runs``.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")
    with _num_threads(threads):
        n_threads = torch.get_num_threads()
        for r in range(warmup):
            _round(models, inputs, r)
        times: list[list[float]] = [[] for _ in models]
        for r in range(runs):
            for i, seconds in _round(models, inputs, warmup + r):
                times[i].append(seconds * 1000.0)
    batch = leading_dim(inputs)
    return [_summary(t, batch, n_threads) for t in times]


def rotation(n: int, round_index: int) -> list[int]:
    """Model order of one round: ``0..n-1`` rotated left by ``round_index``."""
    if n == 0:
        return []
    start = round_index % n
    return [*range(start, n), *range(start)]


def _round(models: Sequence[nn.Module], inputs: Batch, r: int) -> list[tuple[int, float]]:
    """Call each model once in this round's order; (model index, seconds) of each call."""
    timed = []
    for i in rotation(len(models), r):
        timed.append((i, _time_call(models[i], inputs)))
    return timed


def _time_call(model: nn.Module, inputs: Batch) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        call(model, inputs)
        return time.perf_counter() - start


def _summary(times_ms: list[float], batch: int, threads: int) -> dict[str, Any]:
    return {
        "median": statistics.median(times_ms),
        "min": min(times_ms),
        "max": max(times_ms),
        "batch": batch,
        "threads": threads,
        "runs": len(times_ms),
    }


def leading_dim(inputs: Batch) -> int:
    """The batch size: the leading dimension of the first input tensor (1 for a scalar)."""
    if isinstance(inputs, dict):
        first = next(iter(inputs.values()))
    elif isinstance(inputs, tuple | list):
        first = inputs[0]
    else:
        first = inputs
    return int(first.shape[0]) if first.dim() > 0 else 1


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Temporarily use ``threads`` torch CPU threads (no change for None)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
