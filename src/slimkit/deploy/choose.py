"""Pick the runtime that runs a model fastest and faithfully, by measuring on this machine.

``measure_runtimes(model, example, inputs, workdir)`` exports the model to every installed
runtime (onnxruntime from the onnx format, OpenVINO from its own), runs each on ``inputs``
and times it alternately with the torch model itself in one process (median of warm calls).
A runtime is *faithful* when the cosine of its outputs with the torch model's is at least
``FAITHFUL_COSINE``: a runtime may compute differently from torch (OpenVINO's int8 kernels
halve weights to 7 bits on CPUs without VNNI), and that is measured, never assumed.
``fastest(rows)`` is the fastest faithful export. The choice belongs to the machine that
measured it: ``export(..., format="auto")`` records every row in ``export.json``.

``int8_layout()``: which exact operand layout of onnxruntime's ``MatMulInteger`` runs faster
here, int8 x int8 or uint8 x uint8 (both shifted by 128), timed once per process on a
MiniLM-sized product.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time
from collections.abc import Callable
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


#: ``export(model, path, format, example, overwrite=...)``: how the measured exports are written
Exporter = Callable[..., Path]


def measure_runtimes(
    model: nn.Module,
    example: Batch,
    inputs: Batch,
    workdir: Path,
    export: Exporter,
    runtimes: list[str] | None = None,
    runs: int = 5,
    threads: int | None = None,
) -> list[Measured]:
    """torch and each runtime (every installed one by default) on ``inputs``: one row each,
    timed alternately (see the module docstring). ``export`` writes each runtime's model
    under ``workdir``."""
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


#: the exact operand layouts of ``MatMulInteger`` (uint8 x int8 saturates without VNNI)
INT8_LAYOUTS = ("s8s8", "u8u8")


@functools.cache
def int8_layout() -> str:
    """The faster exact ``MatMulInteger`` layout on this CPU (``s8s8`` without onnxruntime)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "s8s8"
    times = {layout: _time_matmul_integer(layout) for layout in INT8_LAYOUTS}
    return min(times, key=lambda k: times[k])


def _time_matmul_integer(layout: str, m: int = 512, k: int = 384, n: int = 1536) -> float:
    """Median seconds of one (m, k) x (k, n) ``MatMulInteger`` in ``layout`` on 2 threads."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    kind, dtype = (TensorProto.INT8, np.int8) if layout == "s8s8" else (TensorProto.UINT8, np.uint8)
    rng = np.random.default_rng(0)
    b = rng.integers(0, 127, (k, n)).astype(dtype)
    inputs, inits = ["A", "B"], [numpy_helper.from_array(b, "B")]
    if layout == "u8u8":
        inits.append(numpy_helper.from_array(np.array(128, np.uint8), "zero"))
        inputs += ["zero", "zero"]
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", inputs, ["Y"])], "mm",
        [helper.make_tensor_value_info("A", kind, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    feed = {"A": rng.integers(0, 127, (m, k)).astype(dtype)}
    session.run(None, feed)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[2]
