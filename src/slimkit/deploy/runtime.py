"""Run an exported model on its runtime behind the torch call signature, so that a task
evaluates and times it like any model: its metrics come from the runtime's own outputs.

``RuntimeModel(path, runtime)``: ``path`` is an export directory (or a ``.onnx`` / ``.xml``
file); ``runtime`` is ``onnxruntime`` or ``openvino``. It takes the inputs the export names
(keyword tensors for a text model, one tensor otherwise) and returns the first output as a
torch tensor. ``precision`` asks OpenVINO for an inference precision (``f32``, ``bf16``); without it
OpenVINO uses its default for the CPU (bf16 on CPUs with AMX). ``threads`` sets the
runtime's thread count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RUNTIMES = ("onnxruntime", "openvino")


def model_file(path: Path, runtime: str) -> Path:
    """The file of an export directory that ``runtime`` reads."""
    if path.is_file():
        return path
    for name in ("model.xml", "model.onnx") if runtime == "openvino" else ("model.onnx",):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} holds no model file that {runtime} reads")


class RuntimeModel(nn.Module):
    """An exported model on ``runtime`` (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        runtime: str = "onnxruntime",
        threads: int | None = None,
        precision: str | None = None,
    ) -> None:
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
        self.runtime, self.precision = runtime, precision
        self.file = model_file(Path(path), runtime)
        self._run, self.input_names = _session(self.file, runtime, threads, precision)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        if kwargs:
            feed = {n: _array(kwargs[n]) for n in self.input_names if n in kwargs}
        else:
            feed = {n: _array(a) for n, a in zip(self.input_names, args, strict=False)}
        return torch.from_numpy(np.ascontiguousarray(self._run(feed)))

    def extra_repr(self) -> str:
        return f"{self.file.name} on {self.runtime}"


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _session(file: Path, runtime: str, threads: int | None, precision: str | None) -> Any:
    """``(run(feed) -> first output, input names)`` of a session on ``runtime``."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return (lambda feed: session.run(None, feed)[0]), names
    import openvino as ov

    config: dict[str, Any] = {}
    if precision:  # else OpenVINO's own default for the CPU (bf16 where it has AMX)
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(file), "CPU", config)
    names = [next(iter(i.get_names())) for i in compiled.inputs]
    request = compiled.create_infer_request()

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(request.infer(feed)[compiled.outputs[0]])

    return run, names
