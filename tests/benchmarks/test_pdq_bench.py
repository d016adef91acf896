"""benchmarks/pdq.py's pure parts: the single-family recipes, comparisons, targets."""

from __future__ import annotations

import pytest

from slimkit.recipe import Recipe, resolve
from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("pdq.py")


def _shipped(name):
    return Recipe.from_file(resolve(name)).to_dict()


def test_family_recipes_are_one_stage_of_the_shipped_recipes_and_valid(bench):
    combined, student = _shipped(bench.RECIPE), _shipped(bench.STUDENT_RECIPE)
    made = bench.family_recipes(combined, student)
    assert [f for f, _, _ in made] == ["prune"] * 3 + ["distill"] * 3 + ["quantize"] * 3
    for family, _setting, recipe in made:
        ((kind, _fields),) = recipe["stages"][0].items()
        assert kind == family and len(recipe["stages"]) == 1
        Recipe.from_dict(recipe)  # every option still valid
    prune = made[2][2]["stages"][0]["prune"]
    assert prune["sparsity"] == 0.95
    assert prune["steps"] == combined["stages"][0]["prune"]["steps"]
    assert made[3][2]["stages"][0]["distill"]["student_width"] == 0.5
    assert made[8][2]["stages"][0]["quantize"]["bits"] == 2


def test_alone_refuses_a_missing_stage(bench):
    with pytest.raises(ValueError, match="0 nas stages"):
        bench.alone(_shipped(bench.RECIPE), "nas")


def _rows(ours_bytes=4000, ours_acc=0.98):
    return [
        {"row": "fp32", "model_bytes": 120000, "accuracy": 0.99},
        {"row": bench_name(), "model_bytes": ours_bytes, "accuracy": ours_acc},
        {
            "row": "p8",
            "family": "prune",
            "setting": "s 0.8",
            "model_bytes": 30000,
            "accuracy": 0.985,
        },
        {"row": "p9", "family": "prune", "setting": "s 0.9", "model_bytes": 3000, "accuracy": 0.96},
        {
            "row": "d5",
            "family": "distill",
            "setting": "w 0.5",
            "model_bytes": 9000,
            "accuracy": 0.97,
        },
        {
            "row": "q4",
            "family": "quantize",
            "setting": "b 4",
            "model_bytes": 18000,
            "accuracy": 0.99,
        },
        {
            "row": "q2",
            "family": "quantize",
            "setting": "b 2",
            "model_bytes": 5000,
            "accuracy": 0.98,
        },
    ]


def bench_name():
    return "prune-distill-quantize"


def test_targets_compare_only_rows_within_the_recipes_drop(bench):
    rows = _rows()
    bench.add_comparisons(rows)
    assert rows[1]["drop"] == pytest.approx(1.0) and rows[1]["smaller"] == pytest.approx(30.0)
    checks = bench.targets(rows)
    assert [c["met"] for c in checks] == [True, True, True]
    # prune 0.9 is smaller but drops more: not comparable; prune 0.8 is the one within
    assert "s 0.8, 30,000 B at +0.50" in checks[0]["figure"]
    # no distill row drops as little: the most accurate is named
    assert "no distill setting drops as little as +1.00" in checks[1]["figure"]
    # quantize 2-bit drops the same (equal counts) and is 5,000 B: larger than 4,000
    assert "b 2, 5,000 B at +1.00" in checks[2]["figure"]


def test_a_smaller_single_family_row_at_equal_drop_is_not_met(bench):
    rows = _rows(ours_bytes=6000)
    bench.add_comparisons(rows)
    checks = bench.targets(rows)
    assert [c["met"] for c in checks] == [True, True, False]


def test_missing_recipe_row_is_not_measured(bench):
    rows = [r for r in _rows() if r["row"] != bench_name()]
    bench.add_comparisons(rows)
    assert all(c["met"] is None for c in bench.targets(rows))
    assert "| p8 | prune | s 0.8 | 30,000 |" in bench.table(rows)
