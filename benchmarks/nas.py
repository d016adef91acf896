"""Architecture search on ``digits-lenet``: the shipped ``nas-quarter`` recipe (evolution
under a quarter of the baseline's parameters) against the fp32 baseline: parameters, ratio,
MACs per example, test accuracy, its drop, trials and wall time (2 threads).

Both models are saved, loaded back and measured loaded. Prints the table and the targets and
writes ``benchmarks/results/nas.json``, ``nas.md`` and ``nas_pareto.png``.

    python benchmarks/nas.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    drop_points,
    fmt,
    format_targets,
    markdown_table,
    percent,
    round_trip,
    shipped_recipe,
    target,
)

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "digits-lenet"
RECIPE = "nas-quarter"
THREADS = 2
# targets
RATIO, DROP, WALL = 0.25, 1.0, 600.0  # params fraction, accuracy points, seconds


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| row | architecture | params | ratio | MACs / example | test accuracy | drop (points) "
        "| trials | wall (s) |"
    )
    body = []
    for r in rows:
        cells = [
            r["row"],
            r.get("architecture", "-"),
            fmt(r.get("params"), ","),
            fmt(r.get("ratio"), ".3f"),
            fmt(r.get("macs"), ","),
            percent(r.get("accuracy")),
            fmt(r.get("drop"), "+.2f"),
            fmt(r.get("trials"), "d"),
            fmt(r.get("seconds"), ".1f"),
        ]
        body.append(cells)
    return markdown_table(header, body)


def targets(base: dict[str, Any], ours: dict[str, Any]) -> list[dict[str, Any]]:
    ratio, drop, wall = ours.get("ratio"), ours.get("drop"), ours.get("seconds")
    return [
        target(
            f"params <= {RATIO:g} of the baseline",
            f"{fmt(ratio, '.3f')} ({fmt(ours.get('params'), ',')} vs "
            f"{fmt(base.get('params'), ',')})",
            None if ratio is None else ratio <= RATIO,
        ),
        target(
            f"accuracy drop <= {DROP:g} point",
            f"{fmt(drop, '+.2f')} points",
            None if drop is None else drop <= DROP,
        ),
        target(
            f"search + retraining wall time < {WALL:g} s ({THREADS} threads)",
            f"{fmt(wall, '.1f')} s",
            None if wall is None else wall < WALL,
        ),
    ]


def render(results: dict[str, Any]) -> str:
    return (
        f"# Architecture search ({TASK}, {RECIPE})\n\n{results['description']}\n\n"
        + table(results["rows"])
        + "\n"
        + format_targets(results["targets"])
    )


def measure(task: Any, model: Any, work: Path, name: str) -> dict[str, Any]:
    """Save, load, and measure params, MACs and test accuracy of the loaded model."""
    from slimkit.compressed import count_params
    from slimkit.evaluate.macs import count_macs

    loaded = round_trip(model, work / name)
    return {
        "params": count_params(loaded),
        "macs": count_macs(loaded, task.example_inputs()),
        **task.evaluate(loaded),
    }


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    import torch

    import slimkit
    import slimkit.nas.stage  # registers the stage
    from slimkit.model_info import info
    from slimkit.tasks import get

    torch.set_num_threads(THREADS)
    task = get(TASK)
    recipe = shipped_recipe(RECIPE)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nas-") as tmp:
        work = Path(tmp)
        (stage,) = recipe["stages"]
        stage["nas"]["log"] = str(work / "search.jsonl")
        stage["nas"]["plot"] = str(RESULTS / "nas_pareto.png")
        base_model = task.model()
        base = {"row": "fp32", "architecture": "LeNet5", **measure(task, base_model, work, "fp32")}
        print(f"-- {TASK} {RECIPE}", flush=True)
        start = time.perf_counter()
        searched = slimkit.compress(
            task.model(), recipe, task=task, progress=lambda s: print(f"   {s}", flush=True)
        )
        seconds = time.perf_counter() - start
        nas = info(searched)["stages"][-1]["record"]
        ours = {
            "row": RECIPE,
            "architecture": nas["winner"]["description"],
            **measure(task, searched, work, RECIPE),
            "trials": nas["trials"],
            "trained": nas["trained"],
            "rejected": nas["rejected"],
            "val_accuracy": nas["winner"]["val_accuracy"],
            "seconds": seconds,
        }
    base["ratio"] = 1.0
    ours["ratio"] = ours["params"] / base["params"]
    ours["drop"] = drop_points(base, ours)
    base["drop"] = 0.0
    rows = [base, ours]
    settings = nas["settings"]
    description = (
        f"torch {torch.__version__}, {THREADS} threads. {RECIPE}: evolution over the task's "
        f"search space, population {settings['population']}, {settings['generations']} "
        f"generations, each candidate trained {settings['epochs']} epochs and scored on a "
        f"held-out {settings['val_fraction']:g} of the training data; limit "
        f"{nas['limits']['max_params']:,} params (0.25 of the baseline); "
        f"{ours['trained']} candidates trained, {ours['rejected']} drawn over the limit and "
        f"never trained; the winner (validation accuracy {ours['val_accuracy']:.4f}) retrained "
        f"{settings['final_epochs']} epochs on all the training data. Wall: search + "
        "retraining. Test accuracy on the 450 test images, saved + loaded models; drop: "
        "baseline minus winner (points). Pareto plot: nas_pareto.png."
    )
    results = {"description": description, "rows": rows, "targets": targets(base, ours)}
    print("\n" + table(rows) + "\n" + format_targets(results["targets"]), flush=True)
    write_text(RESULTS / "nas.json", json.dumps(results, indent=2) + "\n")
    write_text(RESULTS / "nas.md", render(results))
    return results


if __name__ == "__main__":
    run()
