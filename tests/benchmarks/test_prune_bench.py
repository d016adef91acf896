"""benchmarks/prune.py's pure parts: the rows, the table, the targets."""

from __future__ import annotations

import pytest

from slimkit.recipe import Recipe
from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("prune.py")


def test_every_row_is_a_valid_prune_stage(bench):
    import slimkit.prune.nm
    import slimkit.prune.sparsegpt
    import slimkit.prune.unstructured  # noqa: F401

    for name, options in bench.ROWS.items():
        (stage,) = Recipe.from_dict({"name": name, "stages": [{"prune": dict(options)}]}).stages
        assert stage.method == options["method"]


def test_targets_compare_sparsegpt_with_magnitude(bench):
    rows = [
        {"row": "magnitude-50", "cosine_mean": 0.90},
        {"row": "sparsegpt-50", "cosine_mean": 0.95},
        {"row": "magnitude-2:4", "cosine_mean": 0.80},
        {"row": "sparsegpt-2:4", "cosine_mean": 0.79},
    ]
    checks = bench.targets(rows)
    assert [c["met"] for c in checks] == [True, False]
    assert checks[0]["figure"] == "sparsegpt 0.95000 vs magnitude 0.90000"
    assert [c["met"] for c in bench.targets(rows[:2])] == [True, None]
    text = bench.format_targets(checks)
    assert "SparseGPT beats magnitude at 2:4: NOT met" in text


def test_table_rows_and_errors(bench):
    rows = [
        {
            "row": "fp32",
            "cosine_mean": 1.0,
            "cosine_min": 1.0,
            "knn_accuracy": 0.4158,
            "size_bytes": 90875406,
        },
        {"row": "x", "error": "ConfigError: bad"},
    ]
    lines = bench.table(rows).splitlines()
    assert lines[2] == "| fp32 | 1.00000 | 1.00000 | 0.4158 | 90,875,406 | - |  |"
    assert lines[3] == "| x | - | - | - | - | - | ConfigError: bad |"
