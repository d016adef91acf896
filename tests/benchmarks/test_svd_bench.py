"""benchmarks/svd.py's pure parts: comparisons, the table, the targets."""

from __future__ import annotations

import pytest

from slimkit.recipe import Recipe, resolve
from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("svd.py")


def _rows(svd_cos=0.90, dist_cos=0.97, svd_ms=80.0):
    return [
        {"row": "fp32", "params": 100, "macs": 1000, "model_bytes": 400, "latency_ms": 100.0,
         "cosine_mean": 1.0},
        {"row": "svd-50", "params": 70, "macs": 700, "model_bytes": 280, "latency_ms": svd_ms,
         "cosine_mean": svd_cos},
        {"row": "svd-50-distill", "params": 70, "macs": 700, "model_bytes": 280,
         "latency_ms": 81.0, "cosine_mean": dist_cos},
    ]  # fmt: skip


def test_targets_met(bench):
    rows = _rows()
    bench.add_comparisons(rows)
    assert rows[1]["size_ratio"] == pytest.approx(0.7)
    assert rows[1]["speedup"] == pytest.approx(1.25)
    checks = bench.targets(rows)
    assert [c["met"] for c in checks] == [True] * 5
    assert checks[-1]["figure"] == "0.97000 vs 0.90000"


def test_slower_or_no_better_cosine_is_not_met(bench):
    rows = _rows(dist_cos=0.89, svd_ms=120.0)
    bench.add_comparisons(rows)
    met = [c["met"] for c in bench.targets(rows)]
    assert met == [True, True, True, False, False]


def test_failed_row_is_not_measured_and_shown(bench):
    rows = _rows()
    rows[2] = {"row": "svd-50-distill", "error": "RuntimeError: boom"}
    bench.add_comparisons(rows)
    assert bench.targets(rows)[-1]["met"] is None
    assert "RuntimeError: boom" in bench.table(rows)


def test_the_distill_recipe_is_svd_50_then_distill():
    svd = Recipe.from_file(resolve("svd-50")).to_dict()
    both = Recipe.from_file(resolve("svd-50-distill")).to_dict()
    assert both["stages"][0] == svd["stages"][0]
    assert list(both["stages"][1]) == ["distill"]
    assert both["stages"][1]["distill"]["loss"] == "embedding"


def test_recipe_for_chains_shipped_recipes(bench):
    chained = bench.recipe_for("tucker + distill-kd")
    assert chained["name"] == "tucker-distill-kd"
    assert [next(iter(s)) for s in chained["stages"]] == ["factorize", "distill"]
    Recipe.from_dict(chained)
    assert bench.recipe_for("tucker")["stages"][0]["factorize"]["method"] == "tucker"
    timed = bench.recipe_for(bench.TUCKER_TIMED)
    assert timed["stages"][0]["factorize"]["min_speedup"] == bench.MIN_SPEEDUP
    Recipe.from_dict(timed)


def test_resnet_targets_and_table(bench):
    rows = [
        {"row": "fp32", "params": 80290, "macs": 4597440, "model_bytes": 330000,
         "latency_ms": 44.0, "accuracy": 0.9933},
        {"row": "tucker", "params": 40000, "macs": 2500000, "model_bytes": 170000,
         "latency_ms": 50.0, "accuracy": 0.95},
    ]  # fmt: skip
    bench.add_comparisons(rows)
    checks = bench.resnet_targets(rows)
    assert [c["met"] for c in checks] == [True, True, True, False, None]
    assert checks[3]["figure"] == "0.88x"
    rows.append({"row": bench.TUCKER_TIMED, "latency_ms": 40.0})
    bench.add_comparisons(rows)
    assert bench.resnet_targets(rows)[-1]["met"] is True
    assert "| tucker | 40,000 | 2,500,000 | 170,000 | 0.515 | 50.00 | 0.88x | 95.00 |" in (
        bench.resnet_table(rows)
    )
    assert all(c["met"] is None for c in bench.resnet_targets(rows[:1]))
