"""benchmarks/separable.py's pure parts: the recipe split, the table, the targets."""

from __future__ import annotations

import pytest

from slimkit.recipe import Recipe
from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("separable.py")


def _rows(accuracy=0.99):
    return [
        {"row": "fp32", "conv_params": 78408, "params": 80290, "macs": 4597440, "accuracy": 0.9933},
        {
            "row": "separable-fit-only",
            "conv_params": 24441,
            "params": 26323,
            "macs": 1200000,
            "mean_fit_error": 0.8,
            "accuracy": 0.10,
        },
        {"row": "separable", "conv_params": 24441, "params": 26323, "accuracy": accuracy},
    ]


def test_targets_met_not_met_and_not_measured(bench):
    rows = _rows()
    bench.add_comparisons(rows, rows[0])
    assert rows[2]["drop"] == pytest.approx(0.33)
    assert rows[2]["conv_fewer"] == pytest.approx(78408 / 24441)
    checks = bench.targets(rows)
    assert [c["met"] for c in checks] == [True, True]
    assert checks[0]["figure"] == "3.21x (24,441 vs 78,408)"
    assert checks[1]["figure"] == "+0.33 points"
    worse = _rows(accuracy=0.98)
    worse[2]["conv_params"] = 30000
    bench.add_comparisons(worse, worse[0])
    assert [c["met"] for c in bench.targets(worse)] == [False, False]
    errored = [_rows()[0], {"row": "separable", "error": "RuntimeError: x"}]
    bench.add_comparisons(errored, errored[0])
    assert [c["met"] for c in bench.targets(errored)] == [None, None]
    assert "NOT met" in bench.format_targets(bench.targets(worse))


def test_table_rows_and_errors(bench):
    rows = [*_rows(), {"row": "x", "error": "ValueError: bad"}]
    rows[0]["note"] = "saved + loaded"
    bench.add_comparisons(rows, rows[0])
    lines = bench.table(rows).splitlines()
    assert lines[2] == (
        "| fp32 | 78,408 | 1.00x | 80,290 | 4,597,440 | - | 99.33 | +0.00 | saved + loaded |"
    )
    assert lines[3] == (
        "| separable-fit-only | 24,441 | 3.21x | 26,323 | 1,200,000 | 0.8000 | 10.00 | +89.33 |  |"
    )
    assert lines[5] == "| x | - | - | - | - | - | - | - | ValueError: bad |"
    text = bench.render({"description": "d", "rows": rows, "targets": bench.targets(rows)})
    assert text.startswith("# Depthwise-separable convolutions (digits-resnet)")


def test_without_finetune_keeps_the_separable_stage_of_the_shipped_recipe(bench):
    import slimkit.separable.stage  # noqa: F401  (registers the stage)
    from slimkit.recipe import resolve

    shipped = Recipe.from_file(resolve(bench.RECIPE)).to_dict()
    recipe = bench.without_finetune(shipped)
    assert recipe["stages"] == [s for s in shipped["stages"] if "separable" in s]
    (stage,) = Recipe.from_dict(recipe).stages
    assert stage.kind == "separable" and stage.depth_multiplier == 1
    with pytest.raises(ValueError, match="no recovery stage"):
        bench.without_finetune(recipe)
