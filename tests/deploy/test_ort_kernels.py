"""onnxruntime's own kernels in the onnx export.

Grouped 4-bit Linears as MatMulNBits: the packed tensors hold exactly the layer's weight
(ragged last groups included), onnxruntime computes the layer with them, and the export uses
the node for every grouped 4-bit Linear. w8a8 as MatMulInteger: the activations quantized per
token in the graph, the same integer arithmetic as the torch layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import slimkit
from slimkit.deploy import choose
from slimkit.deploy.onnx import nbits_tensors, nbits_weight
from tests.deploy.test_export import compressed
from tests.deploy.toys import ToyImageTask


def grouped(n: int, k: int, block: int, signed: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """(N, K) codes, (N, G) zero points and scales of a grouped 4-bit layer."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // block)
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    zero = (
        torch.zeros(n, groups) if signed else torch.randint(0, 16, (n, groups), generator=g).float()
    )
    scale = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    return codes, zero, scale


def expanded(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, block: int) -> Any:
    k = codes.shape[1]
    z = zero.repeat_interleave(block, dim=1)[:, :k]
    s = scale.repeat_interleave(block, dim=1)[:, :k]
    return (codes.float() - z) * s


def one_node(n: int, k: int, block: int, packed: Any, scales: Any, zeros: Any) -> bytes:
    """A graph of one MatMulNBits node over the given constants."""
    inits = [
        numpy_helper.from_array(packed.numpy(), "B"),
        numpy_helper.from_array(scales.numpy(), "scales"),
    ]
    inputs = ["A", "B", "scales"]
    if zeros is not None:
        inits.append(numpy_helper.from_array(zeros.numpy(), "zeros"))
        inputs.append("zeros")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block
    )
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    k=st.integers(1, 300),
    block=st.sampled_from([16, 32, 64, 128]),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_packed_tensors_hold_the_layer_weight_exactly(
    n: int, k: int, block: int, signed: bool, seed: int
) -> None:
    codes, zero, scale = grouped(n, k, block, signed, seed)
    found = nbits_tensors(codes, zero, scale, block)
    assert found is not None
    packed, scales, zeros = found
    groups = -(-k // block)
    assert packed.dtype == torch.uint8 and packed.shape == (n, groups, block // 2)
    if signed:  # symmetric codes have the default zero point, 8: none stored
        assert zeros is None
    assert torch.equal(nbits_weight(packed, scales, zeros, k), expanded(codes, zero, scale, block))


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(16, 300),
    block=st.sampled_from([16, 32, 128]),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_onnxruntime_computes_the_layer_from_them(
    n: int, k: int, block: int, signed: bool, seed: int
) -> None:
    codes, zero, scale = grouped(n, k, block, signed, seed)
    found = nbits_tensors(codes, zero, scale, block)
    assert found is not None
    graph = one_node(n, k, block, *found)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed))
    want = (x.double() @ expanded(codes, zero, scale, block).double().t()).numpy()
    got = session.run(None, {"A": x.numpy()})[0]
    # fp32 sums of k products: bound relative to the largest output
    assert np.abs(got - want).max() <= 1e-5 * k * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("block", [8, 24])
def test_a_group_size_it_cannot_take_keeps_dequantize_linear(block: int) -> None:
    codes, zero, scale = grouped(4, 48, block, True, 0)
    assert nbits_tensors(codes, zero, scale, block) is None


def test_codes_wider_than_4_bits_are_refused() -> None:
    codes, zero, scale = grouped(4, 64, 32, True, 0)
    codes[0, 0] = 100
    assert nbits_tensors(codes, zero, scale, 32) is None


def test_grouped_4_bit_linears_export_as_matmul_nbits(tmp_path: Path) -> None:
    toy = ToyImageTask()
    model = compressed(toy, "w4-gptq", tmp_path)
    out = slimkit.export(model, tmp_path / "o", "onnx", toy.example_inputs())
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 2  # fc1 and fc2; the convolutions keep DequantizeLinear
    assert ops.count("DequantizeLinear") == 2
    packed = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert all(packed[n.input[1]].data_type == TensorProto.UINT8 for n in nodes)
    x = toy.x[:8]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("layout", ["s8s8", "u8u8"])
def test_w8a8_exports_as_matmul_integer_with_the_layers_arithmetic(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the torch layer's integer arithmetic with full 8-bit activation codes on any CPU
    monkeypatch.setenv("SLIMKIT_INT8_KERNEL", "reference")
    monkeypatch.setattr(choose, "int8_layout", lambda: layout)
    toy = ToyImageTask()
    model = compressed(toy, "w8a8", tmp_path)
    out = slimkit.export(model, tmp_path / "o", "onnx", toy.example_inputs())
    graph = onnx.load(str(out / "model.onnx")).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(nodes) == 2  # fc1 and fc2 (w8a8 quantizes Linears)
    inits = {t.name: t.data_type for t in graph.initializer}
    want_type = TensorProto.INT8 if layout == "s8s8" else TensorProto.UINT8
    assert all(inits[n.input[1]] == want_type for n in nodes)
    x = toy.x[:16]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    # the same codes and integer sums; only the float scale products may round differently
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_the_int8_layout_is_one_of_the_exact_ones_and_measured_once() -> None:
    choose.int8_layout.cache_clear()
    assert choose.int8_layout() in choose.INT8_LAYOUTS
    assert choose.int8_layout.cache_info().hits == 0
    choose.int8_layout()
    assert choose.int8_layout.cache_info().hits == 1


def test_openvino_gets_w8a8_without_onnxruntime_kernels(tmp_path: Path) -> None:
    from slimkit.deploy.onnx import onnx_bytes

    toy = ToyImageTask()
    model = compressed(toy, "w8a8", tmp_path)
    ops = [n.op_type for n in onnx.load_from_string(onnx_bytes(model, toy.x[:2])).graph.node]
    assert "MatMulInteger" not in ops and "MatMulNBits" not in ops
    assert ops.count("DequantizeLinear") == 2
