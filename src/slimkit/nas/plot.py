"""Pareto plot of a search's trials: validation accuracy against cost, the front highlighted."""

from __future__ import annotations

import os
from pathlib import Path

from slimkit.atomic import write_with
from slimkit.nas.search import SearchResult


def plot_trials(
    result: SearchResult, path: str | os.PathLike[str], baseline_cost: int | None = None
) -> Path:
    """Write the PNG at ``path`` (atomically): every trial, the front, the winner, the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    what = result.settings.cost
    label = "parameters" if what == "params" else "MACs / example"
    limit = result.limits.max_params if what == "params" else result.limits.max_macs
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        xs = [t.cost(what) for t in result.trials]
        ys = [100 * t.accuracy for t in result.trials]
        ax.scatter(xs, ys, s=22, color="tab:gray", alpha=0.6, label="trial", zorder=2)
        front = sorted(result.front, key=lambda t: t.cost(what))
        ax.plot(
            [t.cost(what) for t in front],
            [100 * t.accuracy for t in front],
            "o-",
            color="tab:blue",
            label="Pareto front",
            zorder=3,
        )
        w = result.winner
        ax.scatter(
            [w.cost(what)],
            [100 * w.accuracy],
            marker="*",
            s=260,
            color="tab:red",
            zorder=4,
            label=f"winner: {w.genome.describe()}",
        )
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", alpha=0.6, label=f"limit {limit:,}")
        if baseline_cost is not None:
            ax.axvline(baseline_cost, color="black", linestyle=":", alpha=0.6, label="baseline")
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (log scale)")
        ax.set_ylabel("validation accuracy (%, held-out training data)")
        ax.set_title(f"architecture search: {len(result.trials)} trials")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return Path(path)
