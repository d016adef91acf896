"""Ragged quantization groups exported to ONNX: blocked ``DequantizeLinear`` (and
``MatMulNBits``) take a shorter last block; onnxruntime's outputs match torch's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import slimkit
from tests.ragged_toys import RaggedToy, ragged_toy


def toy() -> RaggedToy:
    return ragged_toy()


X = torch.randn(80, 5, 6, 6, generator=torch.Generator().manual_seed(1))

CASES: dict[str, dict[str, Any]] = {
    # 4-bit groups of 32: the Linear as MatMulNBits, the Conv2d as blocked DequantizeLinear
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq", "act_order": True},
    "awq": {"method": "awq", "n_grid": 5},
    "nf4": {"method": "rtn", "format": "nf4", "symmetric": True},
    # 5-bit groups of 20 (not a MatMulNBits block): the Linear as blocked DequantizeLinear too
    "rtn-5bit-g20": {"method": "rtn", "bits": 5, "group_size": 20},
    "gptq-8bit-g20": {"method": "gptq", "bits": 8, "group_size": 20, "symmetric": True},
}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("case", list(CASES))
def test_ragged_layers_export_and_match_torch(case: str, tmp_path: Path) -> None:
    options = {"bits": 4, "granularity": "per_group", "group_size": 32, "symmetric": False}
    options.update(CASES[case])
    model = slimkit.compress(toy(), {"stages": [{"quantize": options}]}, data=[X])
    g = options["group_size"]
    assert model.fc.scale.shape == (16, -(-72 // g)) and model.conv.scale.shape == (8, -(-45 // g))
    assert 72 % g and 45 % g  # both layers have a short last group
    out = slimkit.export(model, tmp_path / "onnx", "onnx", X[:2])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = np.asarray(session.run(None, {"input": X.numpy()})[0])
    with torch.no_grad():
        want = model(X).numpy()
    assert got.shape == want.shape
    assert cosine(got, want) >= 0.9999, case
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max()), case
    if options.get("format") != "nf4":  # integer codes in blocks, never expanded to floats
        nodes = onnx.load(str(out / "model.onnx")).graph.node
        blocked = [n for n in nodes if n.op_type in ("DequantizeLinear", "MatMulNBits")]
        sizes = {a.i for n in blocked for a in n.attribute if a.name == "block_size"}
        assert len(blocked) == 2 and sizes == {g}, [n.op_type for n in blocked]


@pytest.mark.parametrize("case", ["rtn", "rtn-5bit-g20"])
def test_openvino_takes_ragged_layers_as_whole_blocks_cut_back(case: str, tmp_path: Path) -> None:
    """Regression: OpenVINO refuses a blocked DequantizeLinear whose size is not a whole
    number of blocks; the codes are padded to whole blocks and the weight cut back."""
    ov = pytest.importorskip("openvino")
    options = {"bits": 4, "granularity": "per_group", "group_size": 32, "symmetric": False}
    options.update(CASES[case])
    model = slimkit.compress(toy(), {"stages": [{"quantize": options}]}, data=[X])
    out = slimkit.export(model, tmp_path / "ov", "openvino", X[:2])
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU")
    got = np.asarray(compiled(X.numpy())[0])
    with torch.no_grad():
        want = model(X).numpy()
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max()), case
