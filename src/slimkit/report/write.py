"""Write a report directory: report.json, report.md and pareto.png, each atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from slimkit.atomic import write_text
from slimkit.evaluate.result import Report
from slimkit.report.markdown import combined_markdown, to_markdown
from slimkit.report.plot import pareto_plot

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
PLOT_NAME = "pareto.png"
COMBINED_TITLE = "slimkit report"


def write_report(
    report_or_reports: Report | Sequence[Report],
    out_dir: str | os.PathLike[str],
    title: str = COMBINED_TITLE,
) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``pareto.png`` into ``out_dir``.

    One Report: ``report.json`` is that report's dict. Several: ``{"reports": [...]}`` and
    ``report.md`` holds one section per task under ``title``. Returns the three paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(report_or_reports, Report):
        reports = [report_or_reports]
        text = report_or_reports.to_json()
        markdown = to_markdown(report_or_reports)
    else:
        reports = list(report_or_reports)
        if not reports:
            raise ValueError("write_report needs at least one report")
        text = json.dumps({"reports": [r.to_dict() for r in reports]}, indent=2) + "\n"
        markdown = combined_markdown(reports, title)
    paths = [out / JSON_NAME, out / MARKDOWN_NAME, out / PLOT_NAME]
    write_text(paths[0], text)
    write_text(paths[1], markdown)
    pareto_plot(reports, paths[2])
    return paths
