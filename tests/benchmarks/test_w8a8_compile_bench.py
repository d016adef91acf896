"""benchmarks/w8a8_compile.py's pure parts: the table and the output cosine."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("w8a8_compile.py")


def test_table_speedups_are_against_the_first_row(bench):
    rows = [
        {"name": "fp32 eager", "median_ms": 1000.0, "cosine": 1.0, "compile_s": None},
        {"name": "w8a8 compiled", "median_ms": 400.0, "cosine": 0.99712, "compile_s": 61.25},
    ]
    lines = bench.table(rows).splitlines()
    assert lines[2] == "| fp32 eager | 1000 | 1.00x | 1.00000 | - |"
    assert lines[3] == "| w8a8 compiled | 400 | 2.50x | 0.99712 | 61.2 |"


def test_pooled_cosine(bench):
    bench_cos = bench.pooled_cosine
    a = torch.randn(3, 5, 8)
    assert bench_cos(a, a) == pytest.approx(1.0)
    assert bench_cos(a, -a) == pytest.approx(-1.0)
    b = a.clone()
    b[0] = torch.randn(5, 8)
    expected = torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1), dim=-1).mean()
    assert bench_cos(a, b) == pytest.approx(float(expected))


def test_layer_table_shows_speedups_against_fp32(bench):
    rows = [{"shape": "8192 x 384 -> 1536", "fp32_ms": 70.0, "gemm_ms": 50.0, "layer_ms": 87.5}]
    line = bench.layer_table(rows).splitlines()[2]
    assert line == "| 8192 x 384 -> 1536 | 70.0 | 50.0 (1.40x) | 87.5 (0.80x) |"


def test_layer_rows_time_each_shape(bench, monkeypatch):
    import torch

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("fbgemm is not available")
    monkeypatch.setattr(bench, "LAYER_SHAPES", ((64, 32),))
    (row,) = bench.layer_rows(runs=1, tokens=16)
    assert row["shape"] == "16 x 64 -> 32"
    assert all(row[k] > 0 for k in ("fp32_ms", "gemm_ms", "layer_ms"))
