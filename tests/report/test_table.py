from __future__ import annotations

from rich.console import Console
from rich.table import Table

from slimkit.evaluate.result import Report
from slimkit.report.table import human_bytes, human_count, ratio, render_table, rows, title


def test_rows_compare_against_the_baseline(report: Report) -> None:
    base, w8, pruned = rows(report)
    assert base[0] == "fp32" and base[1] == "0.9800" and base[3] == "—"
    assert base[5] == "1.00x" and base[9] == "1.00x"
    assert w8[3] == "-0.0050"
    assert w8[4] == "1.08 MB" and w8[5] == "0.27x"
    assert w8[9] == "1.25x"  # 2.0 ms / 1.6 ms
    assert pruned[9] == "0.80x"
    assert w8[8] == "1.600 (1.440–1.920)"
    assert w8[2] == "f1=0.9650"
    assert w8[11] == "gauss_0.1=0.8750"
    assert (base[12], pruned[12]) == ("no", "yes")
    assert base[6] == "1.23M" and base[7] == "45.6k" and base[10] == "2.50 MB"


def test_title_states_the_latency_setup(report: Report) -> None:
    assert title(report) == ("digits-lenet — latency: batch 32, 2 threads, median of 10 warm runs")


def test_render_prints_every_row(report: Report) -> None:
    console = Console(record=True, width=300)
    table = render_table(report, console)
    assert isinstance(table, Table)
    assert [c.header for c in table.columns] == ["measure", *[r.name for r in report.results]]
    text = console.export_text()
    for needle in ("digits-lenet", "w8-rtn", "prune|50", "0.27x", "1.25x", "median of 10"):
        assert needle in text


def test_render_without_console_prints_nothing(report: Report, capsys) -> None:  # type: ignore[no-untyped-def]
    render_table(report)
    assert capsys.readouterr().out == ""


def test_human_units() -> None:
    assert human_bytes(999) == "999 B"
    assert human_bytes(12_300) == "12.3 kB"
    assert human_bytes(456_000_000) == "456 MB"
    assert human_count(999) == "999"
    assert human_count(2_000_000_000) == "2.00G"
    assert ratio(1, 4) == "0.25x"
    assert ratio(1, 0) == "—"
