from __future__ import annotations

from pathlib import Path

import pytest

from slimkit.report.plot import pareto_plot

from .conftest import make_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = pareto_plot([make_report()], tmp_path / "pareto.png")
    assert path.read_bytes().startswith(PNG)
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]  # no temp file left


def test_one_row_of_panels_per_task(tmp_path: Path) -> None:
    one_row_aspect = 4.5 / 12  # figure height / width for one task
    path = pareto_plot([make_report("a"), make_report("b")], tmp_path / "two.png")
    width, height = _png_size(path)
    assert height / width == pytest.approx(2 * one_row_aspect, rel=0.02)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
