"""The comparison table and notes as GitHub markdown."""

from __future__ import annotations

from collections.abc import Sequence

from slimkit.evaluate.result import Report
from slimkit.report.table import headers, latency_setup, rows

LEGEND = """\
**Columns**

- *model*: the first row is the baseline; every model is measured the same way.
- *Δ*: change of the primary metric vs the baseline.
- *size*: bytes of the saved artifact on disk (`model.safetensors` + `slimkit.json`);
  *size vs base*: that size divided by the baseline's.
- *params*: weights the model represents (nonzeros only, for sparse storage).
- *MACs*: multiply-accumulates of one forward pass on one example, as executed.
- *latency*: wall-clock ms of one forward on the latency batch, median (min–max) of warm runs,
  all models timed alternately in the same process; *speedup*: baseline median / this median.
- *peak mem*: parameter and buffer bytes plus the peak bytes allocated during one forward.
- *robustness*: the primary metric under input noise.
- *simulated*: *yes* when some layers only simulate their compression (fake quantization, a
  mask over dense weights): the metrics show the effect of the compression, but those layers
  are stored and run at full size, so they bring no size or speed gain.
"""


def table_markdown(report: Report) -> str:
    """The report's table as a GitHub markdown table."""
    lines = [_line(headers(report)), _line(["---"] * len(headers(report)))]
    lines += [_line(cells) for cells in rows(report)]
    return "\n".join(lines) + "\n"


def notes_markdown(report: Report) -> str:
    """A bullet list of each result's notes (empty string when there are none)."""
    lines = []
    for result in report.results:
        for note in result.notes:
            lines.append(f"- **{_escape(result.name)}**: {_escape(note)}")
    return "\n".join(lines) + "\n" if lines else ""


def section(report: Report, level: int = 2) -> str:
    """Heading, latency setup, table and notes of one report."""
    parts = [
        f"{'#' * level} {_escape(report.task)}\n",
        f"Latency: {latency_setup(report)}.\n",
        table_markdown(report),
    ]
    notes = notes_markdown(report)
    if notes:
        parts.append(f"Notes:\n\n{notes}")
    return "\n".join(parts)


def to_markdown(report: Report) -> str:
    """One report as a markdown document: table, notes and a legend of the columns."""
    return f"{section(report, level=1)}\n{LEGEND}"


def combined_markdown(reports: Sequence[Report], title: str) -> str:
    """Several reports (one per task) in one markdown document, with one legend."""
    body = "\n".join(section(r, level=2) for r in reports)
    return f"# {_escape(title)}\n\n{body}\n{LEGEND}"


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_escape(c) for c in cells) + " |"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
