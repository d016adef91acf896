"""Artifacts of format version 1, as slimkit wrote them before, keep loading.

``tests/data/artifacts/v1/<kind>/`` holds one small artifact per kind of compressed layer
(see its README): every one must load with the current code, hold the saved tensors bit for
bit, and reproduce the outputs recorded when it was written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import slimkit

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "artifacts" / "v1"
KINDS = sorted(p.name for p in FIXTURES.iterdir() if (p / "slimkit.json").is_file())

#: the compressed layer types each fixture must hold after loading (a fixture that silently
#: loaded as something else would pass the output check only by chance)
EXPECTED_TYPES: dict[str, set[str]] = {
    "w8-rtn": {"QuantLinear", "QuantConv2d"},
    "w4-rtn": {"QuantLinear", "QuantConv2d"},
    "rtn-2to7-bits": {"QuantLinear", "QuantConv2d"},
    "gptq": {"QuantLinear", "QuantConv2d"},
    "awq": {"QuantLinear", "QuantConv2d"},
    "kmeans": {"KMeansLinear", "KMeansConv2d"},
    "sparse": {"SparseLinear", "SparseConv2d"},
    "sparse-csr": {"SparseLinear"},
    "nm-2to4": {"SparseLinear", "SparseConv2d"},
    "sparse-kmeans": {"SparseKMeansLinear", "SparseKMeansConv2d"},
    "huffman-kmeans": {"HuffmanCoded"},
    "huffman-quant": {"HuffmanCoded"},
    "huffman-sparse": {"HuffmanCoded"},
    "huffman-sparse-kmeans": {"HuffmanCoded"},
    "w8a8": {"DynamicQuantLinear"},
    "w8a8-static": {"StaticQuantLinear", "StaticQuantConv2d"},
    "qat": {"StaticQuantLinear", "StaticQuantConv2d"},
    "svd": {"LowRankLinear"},
    "tucker": {"TuckerConv2d"},
    "spatial-svd": {"SpatialConv2d"},
    "separable": {"SeparableConv2d"},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The expected outputs were computed on one thread (convolutions may round otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _manifest(kind: str) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((FIXTURES / kind / "slimkit.json").read_text("utf-8"))
    return manifest


def test_every_layer_kind_has_a_fixture() -> None:
    assert set(EXPECTED_TYPES) <= set(KINDS)
    assert {"fp32", "structured", "structured-resnet", "student", "nas"} <= set(KINDS)
    for kind in KINDS:
        assert _manifest(kind)["format_version"] == 1
        assert (FIXTURES / kind / "expected.safetensors").is_file()


def test_fixtures_stay_small() -> None:
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert total < 2_500_000


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_loads_and_reproduces_its_outputs(kind: str) -> None:
    path = FIXTURES / kind
    model = slimkit.load(path)
    expected = load_file(str(path / "expected.safetensors"))
    with torch.inference_mode():
        out = model(expected["input"])
    assert out.dtype == expected["output"].dtype and out.shape == expected["output"].shape
    # The tensors reload bit for bit (the next test). The outputs match within float
    # rounding: the fixtures were written on an AVX-512 Xeon, and an AVX2-only CPU's float
    # kernels sum in another order (measured: up to 6e-7 on an AMD EPYC, fp32 included).
    torch.testing.assert_close(out, expected["output"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_tensors_reload_bit_for_bit(kind: str) -> None:
    path = FIXTURES / kind
    model = slimkit.load(path)
    saved = load_file(str(path / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) <= set(state)
    for name, tensor in saved.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name
    types = {type(m).__name__ for m in model.modules()}
    assert EXPECTED_TYPES.get(kind, set()) <= types, types


def test_student_and_searched_sources_rebuild_their_architecture() -> None:
    student = slimkit.load(FIXTURES / "student")
    assert student.get_submodule("conv1").out_channels == 8  # half of the task's 16
    assert "student" in _manifest("student")["source"]
    searched = slimkit.load(FIXTURES / "nas")
    assert type(searched).__name__ == "SearchedCNN"
    assert _manifest("nas")["source"]["class"] == "slimkit.nas.space:SearchedCNN"
