"""Pick the runtime that runs a model fastest and faithfully, by measuring on this machine.

``measure_runtimes(model, example, inputs, workdir)`` exports the model to every installed
runtime (onnxruntime from the onnx format, OpenVINO from its own), runs each on ``inputs``
and times it alternately with the torch model itself in one process (median of warm calls).
A runtime is *faithful* when the cosine of its outputs with the torch model's is at least
``FAITHFUL_COSINE``: a runtime may compute differently from torch (OpenVINO's int8 kernels
halve weights to 7 bits on CPUs without VNNI), and that is measured, never assumed.
``fastest(rows)`` is the fastest faithful export. The choice belongs to the machine that
measured it: ``export(..., format="auto")`` records every row in ``export.json``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.data import Batch, call, first_tensor

#: the export format each runtime reads
RUNTIME_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}
#: the least cosine (runtime's outputs vs the torch model's) a faithful runtime keeps
FAITHFUL_COSINE = 0.999


@dataclasses.dataclass(frozen=True)
class Measured:
    """One runtime's run of the model: its median latency (ms) and output cosine."""

    runtime: str
    format: str | None  # None for torch itself
    median_ms: float
    cosine: float

    @property
    def faithful(self) -> bool:
        return self.cosine >= FAITHFUL_COSINE

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "faithful": self.faithful}


def installed_runtimes() -> list[str]:
    """The runtimes whose Python package is importable here."""
    return [r for r in RUNTIME_FORMAT if importlib.util.find_spec(r) is not None]


def measure_runtimes(
    model: nn.Module,
    example: Batch,
    inputs: Batch,
    workdir: Path,
    runtimes: list[str] | None = None,
    runs: int = 5,
    threads: int | None = None,
) -> list[Measured]:
    """torch and each runtime (every installed one by default) on ``inputs``: one row each,
    timed alternately (see the module docstring). Exports go under ``workdir``."""
    from slimkit.deploy import export
    from slimkit.deploy.runtime import RuntimeModel
    from slimkit.evaluate.latency import time_alternating

    names = installed_runtimes() if runtimes is None else runtimes
    models: list[nn.Module] = [model]
    for runtime in names:
        fmt = RUNTIME_FORMAT[runtime]
        path = export(model, workdir / runtime, fmt, example, overwrite=True)
        models.append(RuntimeModel(path, runtime, threads=threads))
    with torch.inference_mode():
        outputs = [first_tensor(call(m, inputs)) for m in models]
    times = time_alternating(models, inputs, runs=runs, warmup=1, threads=threads)
    rows = [Measured("torch", None, times[0]["median"], 1.0)]
    for runtime, out, t in zip(names, outputs[1:], times[1:], strict=True):
        rows.append(Measured(runtime, RUNTIME_FORMAT[runtime], t["median"], _cos(out, outputs[0])))
    return rows


def fastest(rows: list[Measured]) -> Measured | None:
    """The fastest faithful export among ``rows`` (torch itself is not an export), or None."""
    exports = [r for r in rows if r.format is not None and r.faithful]
    return min(exports, key=lambda r: r.median_ms, default=None)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float(x @ y / (x.norm() * y.norm()).clamp(min=1e-30))
