"""Peak memory of one forward pass: resident weights plus the allocation peak."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from slimkit.data import Batch, call


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each tensor counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_forward_bytes(model: nn.Module, inputs: Batch) -> int:
    """Resident bytes of ``model`` plus the peak bytes allocated during one forward.

    The allocation peak comes from the torch profiler's memory events: the running total of
    CPU bytes allocated, relative to the total just before the forward's first allocation.
    The inputs, allocated beforehand, are not counted.
    """
    return resident_bytes(model) + forward_allocation_peak(model, inputs)


def forward_allocation_peak(model: nn.Module, inputs: Batch) -> int:
    """Peak bytes allocated (and not yet freed) during one forward under inference mode."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        with torch.inference_mode():
            call(model, inputs)
    finally:
        with _quiet_stderr():
            prof.stop()
    return _peak(_allocations(prof))


def _allocations(prof: profile) -> list[tuple[int, int, int]]:
    """(time_ns, alloc_size, total_allocated) of each CPU allocation or free, in time order."""
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        return []
    events = []
    for node in _walk(results.experimental_event_tree()):
        fields = node.extra_fields
        total = getattr(fields, "total_allocated", None)
        if total is None or str(getattr(fields, "device", "cpu")) != "cpu":
            continue
        events.append((int(node.start_time_ns), int(fields.alloc_size), int(total)))
    return sorted(events)


def _walk(nodes: Iterable[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _peak(events: list[tuple[int, int, int]]) -> int:
    """Max running total, less the total before the first event (never negative)."""
    if not events:
        return 0
    _, first_size, first_total = events[0]
    before = first_total - first_size
    return max(0, max(total for _, _, total in events) - before)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's native code logs there on start/stop.

    Only the profiler's start and stop run inside this, never the measured forward.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded, captured): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def rss_growth_bytes(model: nn.Module, inputs: Batch) -> int:
    """How far the process's resident memory peaks above its level before one call of
    ``model`` (a runtime's session, whose allocations torch does not see): the kernel's
    high-water mark, reset first (``/proc/self/clear_refs``); 0 where Linux's /proc is not
    there to read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        with torch.inference_mode():
            call(model, inputs)
        return max(0, _status_kib("VmHWM") - before) * 1024
    except (OSError, ValueError):
        return 0


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise ValueError(f"{key} not in /proc/self/status")
