"""benchmarks/distill.py's pure parts: spread, the tables, the targets, merging."""

from __future__ import annotations

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("distill.py")


def test_spread_of_seeds(bench):
    s = bench.spread([0.96, 0.98, 0.97])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.97)
    assert s["std"] == pytest.approx(0.01) and (s["min"], s["max"]) == (0.96, 0.98)
    assert bench.spread([0.5])["std"] == 0.0
    assert bench.spread([])["mean"] is None


def _lenet_rows(bench, soft=(0.98, 0.97), hard=(0.96, 0.95)):
    rows = [
        bench.seed_row(bench.TEACHER, [0.99], params=31294, note="saved + loaded"),
        bench.seed_row(bench.DISTILLED, list(soft), params=8140),
        bench.seed_row(bench.HARD, list(hard), params=8140),
    ]
    bench.add_comparisons(rows, rows[0])
    return rows


def test_lenet_targets_and_table(bench):
    rows = _lenet_rows(bench)
    (check,) = bench.lenet_targets(rows)
    assert check["met"] is True
    assert check["figure"] == "97.50 vs 95.50 (+2.00 points; std 0.71 vs 0.71, 2 and 2 seeds)"
    assert bench.lenet_targets(_lenet_rows(bench, soft=(0.95,)))[0]["met"] is False
    errored = [rows[0], rows[1], {"row": bench.HARD, "error": "RuntimeError: x"}]
    assert bench.lenet_targets(errored)[0]["met"] is None
    lines = bench.lenet_table(rows).splitlines()
    assert lines[3] == (
        "| half-width, distilled | 8,140 | 0.26x | 98.00 / 97.00 | 97.50 | 0.71 | 97.00 "
        "| 98.00 |  |"
    )
    assert "NOT met" in bench.format_targets(bench.lenet_targets(_lenet_rows(bench, soft=(0.9,))))


def _minilm_rows(bench, cosine=0.96, student_ms=50.0):
    rows = [
        {
            "row": "teacher (fp32)",
            "layers": 6,
            "params": 22713216,
            "cosine_mean": 1.0,
            "cosine_min": 1.0,
            "knn_accuracy": 0.8,
            "latency_ms": 100.0,
        },
        {
            "row": bench.STUDENT_BEFORE,
            "layers": 3,
            "params": 17389440,
            "cosine_mean": 0.33,
            "cosine_min": 0.1,
            "knn_accuracy": 0.3,
            "latency_ms": 51.0,
        },
        {
            "row": bench.STUDENT_AFTER,
            "layers": 3,
            "params": 17389440,
            "cosine_mean": cosine,
            "cosine_min": 0.8,
            "knn_accuracy": 0.75,
            "latency_ms": student_ms,
        },
    ]
    bench.add_comparisons(rows, rows[0])
    return rows


def test_minilm_targets_and_table(bench):
    rows = _minilm_rows(bench)
    assert rows[2]["speedup"] == pytest.approx(2.0)
    checks = bench.minilm_targets(rows)
    assert [c["met"] for c in checks] == [True, True]
    assert checks[0]["figure"] == "0.9600 (min 0.8000)"
    assert checks[1]["figure"] == "2.00x (50.0 ms)"
    worse = bench.minilm_targets(_minilm_rows(bench, cosine=0.9, student_ms=90.0))
    assert [c["met"] for c in worse] == [False, False]
    assert [c["met"] for c in bench.minilm_targets(rows[:2])] == [None, None]
    lines = bench.minilm_table(rows).splitlines()
    assert lines[4] == (
        "| 3-layer, distilled | 3 | 17,389,440 | 0.77x | 0.9600 | 0.8000 | 75.00 | 50.0 "
        "| 2.00x |  |"
    )


def test_merge_keeps_other_sections_in_order_and_render(bench):
    saved = {"sections": {"minilm": {"rows": [], "targets": [], "title": "old"}}}
    new = {"lenet": {"rows": _lenet_rows(bench), "targets": [], "title": "L"}}
    merged = bench.merge(saved, new)
    assert list(merged["sections"]) == ["lenet", "minilm"]
    text = bench.render(merged)
    assert "## L" in text and "## old" in text


def test_with_stage_replaces_the_distill_options(bench):
    recipe = {"name": "r", "stages": [{"distill": {"alpha": 0.9, "seed": 0}}]}
    out = bench.with_stage(recipe, alpha=0.0, seed=3)
    assert out["stages"][0]["distill"] == {"alpha": 0.0, "seed": 3}
    assert recipe["stages"][0]["distill"]["alpha"] == 0.9
    with pytest.raises(ValueError, match="not a single distill stage"):
        bench.with_stage({"name": "q", "stages": [{"quantize": {}}]})
