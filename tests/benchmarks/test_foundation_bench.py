"""Smoke test of benchmarks/foundation.py's summary on a report of the real shape."""

from __future__ import annotations

from tests.benchmarks.conftest import load_script


def load_bench():
    return load_script("foundation.py")


def result(cos: float, knn: float, size: int) -> dict:
    return {
        "metrics": {"cosine_mean": cos, "cosine_min": cos - 0.001, "knn_accuracy": knn},
        "size_bytes": size,
        "latency_ms": {"median": 100.0, "min": 90.0, "max": 110.0, "batch": 64, "threads": 2},
        "simulated": False,
    }


def test_summary_checks_every_target():
    bench = load_bench()
    good = bench.summarize("x", {"results": [result(1.0, 0.42, 1000), result(0.9995, 0.418, 290)]})
    assert good["targets_met"] and abs(good["knn_drop_points"] - 0.2) < 1e-9
    too_big = bench.summarize(
        "x", {"results": [result(1.0, 0.42, 1000), result(0.9995, 0.42, 310)]}
    )
    assert not too_big["targets_met"]
    knn_drop = bench.summarize(
        "x", {"results": [result(1.0, 0.42, 1000), result(0.9995, 0.41, 200)]}
    )
    assert not knn_drop["targets_met"]
    text = bench.markdown([good, too_big])
    assert "| x | 0.99950 |" in text and "NO" in text and "0.290x" in text
