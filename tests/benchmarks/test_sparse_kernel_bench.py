"""benchmarks/sparse_kernel.py's pure parts: the tables, the env switch, the pruned layer."""

from __future__ import annotations

import os

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("sparse_kernel.py")


def test_layer_table_speedup_is_dense_over_csr(bench):
    row = {"shape": "300x784", "density": 0.05, "batch": 1, "dense_ms": 0.2, "csr_ms": 0.05}
    row.update(auto_ms=0.06, auto_choice="csr")
    line = bench.layer_table([row]).splitlines()[2]
    assert line == "| 300x784 | 0.05 | 1 | 0.200 | 0.050 | 0.060 | csr | 4.00x |"


def test_model_table_speedups_are_against_fp32(bench):
    row = {"model": "mlp", "density": 0.05, "batch": 256, "fp32_ms": 10.0, "dense_ms": 10.0}
    row.update(csr_ms=5.0, auto_ms=4.0, auto_choice="fc1 csr")
    line = bench.model_table([row]).splitlines()[2]
    assert line.endswith("| fc1 csr | 1.00x / 2.00x / 2.50x |")


def test_kernel_env_restores_the_variable(bench, monkeypatch):
    monkeypatch.setenv(bench.ENV, "dense")
    with bench.kernel_env("csr"):
        assert os.environ[bench.ENV] == "csr"
    with bench.kernel_env(None):
        assert bench.ENV not in os.environ
    assert os.environ[bench.ENV] == "dense"


def test_pruned_linear_has_the_exact_density(bench):
    m = bench.pruned_linear(30, 20, 0.1)
    assert int((m.weight != 0).sum()) == 60
