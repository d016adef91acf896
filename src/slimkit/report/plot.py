"""Pareto plot: primary metric vs size on disk and vs latency, one row per task."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimkit.atomic import write_with
from slimkit.evaluate.result import Report, Result


def pareto_plot(reports: Sequence[Report], path: str | os.PathLike[str]) -> Path:
    """Draw the plot and write it as PNG at ``path`` (atomically); return the path."""
    if not reports:
        raise ValueError("pareto_plot needs at least one report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(12, 4.5 * len(reports)), squeeze=False)
    try:
        for report, (size_ax, latency_ax) in zip(reports, axes, strict=True):
            _panel(size_ax, report, _size_mb, "size on disk (MB, log scale)")
            _plain_log_ticks(size_ax)
            _panel(latency_ax, report, _latency, _latency_label(report))
        _margins(fig)
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return Path(path)


def _panel(ax: Any, report: Report, x_of: Callable[[Result], float], xlabel: str) -> None:
    """Scatter every result (baseline a red star, simulated ones hollow), each labelled."""
    labelled: set[str] = set()
    for i, result in enumerate(report.results):
        x, y = x_of(result), result.primary()
        kind = "baseline" if i == 0 else "simulated" if result.simulated else "compressed"
        label = None if kind in labelled else kind
        labelled.add(kind)
        ax.scatter([x], [y], label=label, zorder=3, **_MARKERS[kind])
        ax.annotate(result.name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(report.baseline.primary_metric)
    ax.set_title(report.task)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _plain_log_ticks(ax: Any) -> None:
    """Log-scale x axis labelled ``0.5, 1, 2`` rather than ``5 x 10^-1``."""
    from matplotlib.ticker import LogFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


_MARKERS: dict[str, dict[str, Any]] = {
    "baseline": {"marker": "*", "s": 220, "color": "tab:red"},
    "compressed": {"marker": "o", "s": 60, "color": "tab:blue"},
    "simulated": {"marker": "o", "s": 60, "facecolors": "none", "edgecolors": "tab:blue"},
}


def _margins(fig: Any) -> None:
    """Fixed margins (in inches, so they do not grow with the rows); cheaper than tight_layout."""
    height = fig.get_figheight()
    fig.subplots_adjust(
        left=0.07, right=0.98, top=1 - 0.45 / height, bottom=0.6 / height, wspace=0.22, hspace=0.4
    )


def _size_mb(result: Result) -> float:
    return max(result.size_bytes, 1) / 1e6


def _latency(result: Result) -> float:
    return float(result.latency_ms["median"])


def _latency_label(report: Report) -> str:
    lat = report.baseline.latency_ms
    return f"latency median (ms), batch {lat['batch']}, {lat['threads']} threads"
