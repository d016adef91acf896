"""benchmarks/_common.py: the helpers every benchmark script shares."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def common():
    return load_script("_common.py")


def test_markdown_table_has_a_rule_per_column_and_a_line_per_row(common):
    text = common.markdown_table("| a | b |", [["1", "2"], ["x", "-"]])
    assert text == "| a | b |\n|---|---|\n| 1 | 2 |\n| x | - |\n"
    assert common.markdown_table("| only |", []) == "| only |\n|---|\n"


def test_time_rows_fills_each_row_and_reports_the_load(common):
    rows = [{"row": "a"}, {"row": "b"}]
    timed = [(rows[0], nn.Linear(4, 4)), (rows[1], nn.Identity())]
    load = common.time_rows(timed, torch.zeros(2, 4), runs=3, warmup=1, threads=1)
    assert load >= 0.0
    for r in rows:
        assert r["latency_ms"] == r["latency"]["median"] > 0
        assert r["latency"]["runs"] == 3 and r["latency"]["threads"] == 1


def test_drop_points_and_formatting(common):
    assert common.drop_points({"accuracy": 0.99}, {"accuracy": 0.98}) == pytest.approx(1.0)
    assert common.drop_points({"accuracy": 0.99}, {}) is None
    assert (common.fmt(None, ","), common.percent(0.9911), common.ratio(2.5)) == (
        "-",
        "99.11",
        "2.50x",
    )
