from __future__ import annotations

import json
from pathlib import Path

from slimkit.evaluate.result import Report
from slimkit.report.write import write_report

from .conftest import make_report


def test_one_report(tmp_path: Path) -> None:
    report = make_report()
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "pareto.png"]
    assert Report.from_json(paths[0].read_text()) == report
    assert "0.27x" in paths[1].read_text()
    assert paths[2].read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


def test_several_reports(tmp_path: Path) -> None:
    reports = [make_report("digits"), make_report("topics")]
    write_report(reports, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert list(data) == ["reports"]
    assert [Report.from_dict(r) for r in data["reports"]] == reports
    text = (tmp_path / "report.md").read_text()
    assert "## digits" in text and "## topics" in text
