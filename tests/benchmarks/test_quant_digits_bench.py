"""benchmarks/quant_digits.py's pure parts: the rows it runs, the table, the targets."""

from __future__ import annotations

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("quant_digits.py")


def r(task, name, accuracy, drop, **more):
    return {"task": task, "row": name, "accuracy": accuracy, "drop": drop, **more}


def all_met_rows(bench):
    lenet, mlp = "digits-lenet", "digits-mlp"
    rows = [r(lenet, f"w8a8-static/{o}", 0.99, 0.1) for o in bench.OBSERVERS]
    for bits in bench.LOW_BITS:
        rows += [r(lenet, f"ptq-w{bits}a{bits}/{o}", 0.95, 4.0) for o in bench.OBSERVERS]
        rows.append(r(lenet, f"qat-w{bits}a{bits}", 0.985, 0.5))
    rows += [
        r(lenet, "ternary-qat", 0.98, 1.1),
        r(mlp, "kmeans-4bit", 0.988, 0.2),
        r(mlp, "ptq-w4a4/minmax", 0.988, 0.0),  # another task: not compared with lenet's QAT
        r(mlp, "ternary-qat", 0.97, 1.9),
    ]
    return rows


def status(checks):
    return [c["met"] for c in checks]


def test_every_row_names_a_shipped_recipe_and_valid_options(bench):
    names = [(task, name) for task, name, _, _ in bench.ROWS]
    assert len(names) == len(set(names))
    for _, name, shipped, changes in bench.ROWS:
        recipe = bench.recipe_for(shipped, changes, name)  # validates every option
        (stage,) = recipe.stages
        for key, value in changes.items():
            assert getattr(stage, key) == value
    observers = {name.split("/")[1] for _, name, _, _ in bench.ROWS if "w8a8-static/" in name}
    assert observers == set(bench.OBSERVERS)


def test_targets_all_met(bench):
    checks = bench.targets(all_met_rows(bench))
    assert status(checks) == [True] * len(checks)
    text = bench.format_targets(checks)
    assert "digits-lenet w8a8-static (kl) drops <= 0.3 points: met (+0.10 points)" in text
    assert "digits-lenet ternary-qat accuracy reported: met (98.00% (+1.10))" in text


def test_targets_fail_when_a_bound_is_passed(bench):
    rows = all_met_rows(bench)
    rows[0]["drop"] = 0.31  # w8a8-static/minmax
    checks = bench.targets(rows)
    assert checks[0]["met"] is False and all(c["met"] for c in checks[1:])


def test_qat_must_beat_every_post_training_row(bench):
    rows = all_met_rows(bench)
    rows[len(bench.OBSERVERS)]["drop"] = 0.5  # ptq-w4a4/minmax drops no more than QAT
    comparison = [c for c in bench.targets(rows) if "drops more" in c["target"]]
    assert [c["met"] for c in comparison] == [False, True, True]  # W4A4, W3A3, W2A2
    assert "ptq-w4a4/minmax +0.50" in comparison[0]["figure"]


def test_missing_rows_are_not_measured_and_errors_count_as_no_result(bench):
    assert set(status(bench.targets([]))) == {None}
    rows = [r("digits-mlp", "kmeans-4bit", None, None, error="RecipeError: boom")]
    km = [c for c in bench.targets(rows) if "kmeans" in c["target"]]
    assert km[0]["met"] is None and km[0]["figure"] == "no result"


def test_table_formats_rows_and_errors(bench):
    rows = [
        r("digits-lenet", "fp32", 0.99111, 0.0, cross_entropy=0.1443, size_bytes=250_000),
        r("digits-lenet", "x", None, None, error="ConfigError: bad"),
    ]
    rows[0].update(simulated=False, size_ratio=1.0, model_bytes=240_000)
    lines = bench.table(rows).splitlines()
    assert len(lines) == 4
    assert (
        "| digits-lenet | fp32 | 99.11 | +0.00 | 0.1443 | 250,000 | 240,000 | 1.000x |"
        in (lines[2])
    )
    assert lines[3].endswith("| - | ConfigError: bad |")


def test_drop_points(bench):
    assert bench.drop_points({"accuracy": 0.99}, {"accuracy": 0.98}) == pytest.approx(1.0)
    assert bench.drop_points({"accuracy": 0.99}, {"row": "x"}) is None
