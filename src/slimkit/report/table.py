"""The comparison table: one row per model in markdown, one column per model on the terminal.

The first result is the baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimkit.evaluate.result import Report, Result

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

NO_VALUE = "—"


def headers(report: Report) -> list[str]:
    primary = report.baseline.primary_metric
    return [
        "model",
        primary,
        "other metrics",
        f"Δ {primary}",
        "size",
        "size vs base",
        "params",
        "MACs",
        "latency ms (min–max)",
        "speedup",
        "peak mem",
        "robustness",
        "simulated",
    ]


def rows(report: Report) -> list[list[str]]:
    """The table cells, as text, one list per result."""
    base = report.baseline
    return [row(r, base) for r in report.results]


def row(result: Result, base: Result) -> list[str]:
    lat = result.latency_ms
    others = {k: v for k, v in result.metrics.items() if k != result.primary_metric}
    return [
        result.name,
        number(result.primary()),
        pairs(others),
        NO_VALUE if result is base else f"{result.primary() - base.primary():+.4f}",
        human_bytes(result.size_bytes),
        ratio(result.size_bytes, base.size_bytes),
        human_count(result.params),
        human_count(result.macs),
        f"{lat['median']:.3f} ({lat['min']:.3f}–{lat['max']:.3f})",
        ratio(base.latency_ms["median"], lat["median"]),
        human_bytes(result.peak_mem_bytes),
        pairs(result.robustness),
        "yes" if result.simulated else "no",
    ]


def title(report: Report) -> str:
    return f"{report.task} — latency: {latency_setup(report)}"


def latency_setup(report: Report) -> str:
    """``batch B, T threads, median of N warm runs`` from the baseline's latency record."""
    lat = report.baseline.latency_ms
    runs = f"median of {lat['runs']} warm runs" if "runs" in lat else "median of warm runs"
    return f"batch {lat['batch']}, {lat['threads']} threads, {runs}"


def measures(report: Report) -> list[tuple[str, list[str]]]:
    """The table transposed: one (measure, cells per result) pair a line."""
    base, results = report.baseline, report.results
    metric_names = list(base.metrics) + [
        k for r in results for k in r.metrics if k not in base.metrics
    ]
    robust_names = list(dict.fromkeys(k for r in results for k in r.robustness))
    lines = [(m, [_metric(r.metrics.get(m)) for r in results]) for m in metric_names]
    lines.append((f"Δ {base.primary_metric}", [row(r, base)[3] for r in results]))
    for label, index in (("size on disk", 4), ("size vs base", 5), ("params", 6), ("MACs", 7)):
        lines.append((label, [row(r, base)[index] for r in results]))
    lines.append(("latency ms median", [f"{r.latency_ms['median']:.3f}" for r in results]))
    lines.append(("latency ms min–max", [_spread(r) for r in results]))
    lines.append(("speedup", [row(r, base)[9] for r in results]))
    lines.append(("peak memory", [row(r, base)[10] for r in results]))
    lines += [(f"noise {k}", [_metric(r.robustness.get(k)) for r in results]) for k in robust_names]
    lines.append(("simulated", [row(r, base)[12] for r in results]))
    return lines


def _metric(value: float | None) -> str:
    return NO_VALUE if value is None else number(value)


def _spread(result: Result) -> str:
    return f"{result.latency_ms['min']:.3f}–{result.latency_ms['max']:.3f}"


def render_table(report: Report, console: Console | None = None) -> Table:
    """The report as a rich Table, one column per model (the baseline first); printed on
    ``console`` when one is given."""
    from rich.table import Table

    table = Table(title=title(report))
    table.add_column("measure", justify="left")
    for result in report.results:
        table.add_column(result.name, justify="right", overflow="fold")
    for label, cells in measures(report):
        table.add_row(label, *cells)
    if console is not None:
        console.print(table)
    return table


# -- formatting ------------------------------------------------------------------------
def number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def pairs(values: dict[str, float]) -> str:
    """``a=0.91, b=0.88``, or a dash when empty."""
    return ", ".join(f"{k}={number(v)}" for k, v in values.items()) or NO_VALUE


def ratio(value: float, base: float) -> str:
    """``value / base`` as ``0.27x`` (a dash when the base is zero)."""
    return f"{value / base:.2f}x" if base else NO_VALUE


def human_bytes(n: int) -> str:
    """Decimal units: ``950 B``, ``12.3 kB``, ``4.56 MB``, ``120 GB``."""
    if n < 1000:
        return f"{n} B"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{_short(n / scale)} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    """``950``, ``12.3k``, ``4.56M``, ``120G``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{_short(n / scale)}{unit}"
    return str(n)


def _short(value: float) -> str:
    """Three significant digits: ``1.23``, ``45.6``, ``789``."""
    return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}"
