"""RuntimeModel: an export run on its runtime behind the torch call signature."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimkit
from slimkit.deploy.runtime import RuntimeModel
from tests.deploy.toys import ToyImageTask


@pytest.mark.parametrize(("runtime", "fmt"), [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_a_task_evaluates_the_runtime_model_from_its_own_outputs(
    runtime: str, fmt: str, tmp_path: Path
) -> None:
    pytest.importorskip(runtime)
    task = ToyImageTask()
    model = slimkit.compress(task.model(), "w8-rtn", task=task)
    out = slimkit.export(model, tmp_path / "o", fmt, task.example_inputs())
    on_runtime = RuntimeModel(out, runtime, threads=1)
    with torch.inference_mode():
        want = model(task.x)
    got = on_runtime(task.x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # OpenVINO may quantize activations on the fly for integer weights: cosine, not equality
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert float(cos) >= 0.9999
    assert task.evaluate(on_runtime) == pytest.approx(task.evaluate(model), abs=1 / 96)


def test_bad_runtime_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runtime 'tvm'; allowed: onnxruntime, openvino"):
        RuntimeModel(tmp_path, "tvm")
    with pytest.raises(FileNotFoundError, match="holds no model file that onnxruntime reads"):
        RuntimeModel(tmp_path, "onnxruntime")
