from __future__ import annotations

from slimkit.evaluate.result import Report
from slimkit.report.markdown import combined_markdown, to_markdown

from .conftest import make_report


def test_markdown_table_has_ratios_and_notes(report: Report) -> None:
    text = to_markdown(report)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    table = lines[lines.index(header) : lines.index(header) + 5]
    assert table[1].startswith("| --- |")
    assert len(table[2:]) == 3 and all(line.startswith("| ") for line in table[2:])
    assert "0.27x" in table[3] and "1.25x" in table[3]
    assert "prune\\|50" in table[4]  # a pipe in a name does not split the cell
    assert "- **w8-rtn**: 4 x QuantLinear: int8" in text
    assert "batch 32, 2 threads, median of 10 warm runs" in text


def test_markdown_legend_explains_the_columns(report: Report) -> None:
    text = to_markdown(report)
    assert "bytes of the saved artifact on disk" in text
    assert "alternately in the same process" in text
    assert "*simulated*" in text


def test_combined_has_one_section_per_task_and_one_legend() -> None:
    text = combined_markdown([make_report("digits"), make_report("topics")], "demo results")
    assert text.startswith("# demo results\n")
    assert "## digits" in text and "## topics" in text
    assert text.count("| model |") == 2
    assert text.count("**Columns**") == 1
