"""Deep Compression on the digits models: the shipped ``deep-compression`` recipe (prune with
fine-tuning, k-means weight sharing with fine-tuned shared values, Huffman coding) run one
stage at a time on ``digits-mlp`` and ``digits-lenet``, the model saved, reloaded and evaluated
after every stage: ``model.safetensors`` bytes, the ratio to fp32's, ``slimkit.json`` bytes,
test accuracy and its drop. A second variant prunes to 90% instead of 95% (the rest the same).

    python benchmarks/deep_compression.py [--task digits-mlp digits-lenet] [--variant ...]

Writes ``benchmarks/results/deep_compression.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import drop_points, error_line, fmt, format_targets, markdown_table, target

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RECIPE = "deep-compression"
TASKS = ("digits-mlp", "digits-lenet")
#: variant -> the sparsity of its prune stage (None: the recipe's own)
VARIANTS: dict[str, float | None] = {RECIPE: None, f"{RECIPE}-90": 0.9}
RATIO, DROP = 40.0, 0.5  # x smaller model.safetensors, accuracy points
THREADS = 2


# -- tables and targets (pure) ----------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| task | variant | after stage | model.safetensors bytes | x smaller than fp32 "
        "| slimkit.json bytes | accuracy | drop (points) | stage s | note |"
    )
    body = []
    for r in rows:
        acc = r.get("accuracy")
        cells = [
            r["task"],
            r["variant"],
            r["stage"],
            fmt(r.get("model_bytes"), ","),
            fmt(r.get("ratio"), ".1f") + ("x" if r.get("ratio") is not None else ""),
            fmt(r.get("json_bytes"), ","),
            "-" if acc is None else f"{100 * acc:.2f}%",
            fmt(r.get("drop"), "+.2f"),
            fmt(r.get("seconds"), ".1f"),
            r.get("error", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def _final(rows: list[dict[str, Any]], task: str, variant: str) -> dict[str, Any]:
    mine = [r for r in rows if r["task"] == task and r["variant"] == variant]
    return mine[-1] if mine else {}


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, the shipped recipe's final model: >= RATIO x smaller, drop <= DROP points."""
    out = []
    for task in sorted({r["task"] for r in rows if r["variant"] == RECIPE}):
        r = _final(rows, task, RECIPE)
        ratio, drop = r.get("ratio"), r.get("drop")
        out.append(
            target(
                f"{task} {RECIPE}: model.safetensors >= {RATIO:g}x smaller than fp32's",
                f"{fmt(ratio, '.1f')}x",
                None if ratio is None else ratio >= RATIO,
            )
        )
        out.append(
            target(
                f"{task} {RECIPE}: accuracy drop <= {DROP:g} points",
                f"{fmt(drop, '+.2f')} points",
                None if drop is None else drop <= DROP,
            )
        )
    return out


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Each row's ratio and drop against the fp32 row of its task."""
    base = {r["task"]: r for r in rows if r["stage"] == "fp32"}
    for r in rows:
        b = base.get(r["task"], {})
        if r.get("model_bytes") and b.get("model_bytes"):
            r["ratio"] = b["model_bytes"] / r["model_bytes"]
        drop = drop_points(b, r)
        if drop is not None:
            r["drop"] = drop


# -- measuring ---------------------------------------------------------------------------------
def _measure(task: Any, model: Any, where: Path) -> dict[str, Any]:
    """Save, reload and evaluate ``model``; the loaded model is the one evaluated."""
    import slimkit

    path = slimkit.save(model, where, overwrite=True)
    out = {
        "model_bytes": (path / "model.safetensors").stat().st_size,
        "json_bytes": (path / "slimkit.json").stat().st_size,
    }
    out.update(task.evaluate(slimkit.load(path)))
    shutil.rmtree(path)
    return out


def stages_of(sparsity: float | None) -> list[Any]:
    """The shipped recipe's stages, the prune stage's sparsity replaced when given."""
    from slimkit.recipe import as_recipe

    stages = list(as_recipe(RECIPE).stages)
    if sparsity is not None:
        stages[0] = dataclasses.replace(stages[0], sparsity=sparsity)
    return stages


def run_task(task_name: str, variants: list[str], work: Path) -> list[dict[str, Any]]:
    import torch

    import slimkit
    from slimkit.recipe import Recipe
    from slimkit.tasks import get

    task = get(task_name)
    torch.manual_seed(0)
    rows = [{"task": task_name, "variant": "-", "stage": "fp32"}]
    print(f"-- {task_name} fp32", flush=True)
    rows[0].update(_measure(task, task.model(), work / "fp32"))
    for variant in variants:
        torch.manual_seed(0)
        model = task.model()
        for i, stage in enumerate(stages_of(VARIANTS[variant])):
            label = f"{stage.kind}: {stage.method}"
            if stage.kind == "prune":
                label += f" {stage.sparsity:g}"
            row: dict[str, Any] = {"task": task_name, "variant": variant, "stage": label}
            print(f"-- {task_name} {variant} {label}", flush=True)
            try:
                start = time.perf_counter()
                model = slimkit.compress(model, Recipe(f"{variant}-{i}", (stage,)), task=task)
                row["seconds"] = time.perf_counter() - start
                row.update(_measure(task, model, work / f"{variant}-{i}"))
            except Exception as e:  # a failing stage is reported; the variant stops there
                row["error"] = error_line(e)
                rows.append(row)
                break
            rows.append(row)
    return rows


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--variant", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="deep-") as tmp:
        for task_name in args.task:
            rows += run_task(task_name, args.variant, Path(tmp))
    add_comparisons(rows)
    checks = targets(rows)
    text = (
        f"# Deep Compression ({RECIPE})\n\ntorch {torch.__version__}, {THREADS} threads. "
        "Each stage's output saved, reloaded and evaluated (450 test images: one image is "
        "0.22 points). 'x smaller' compares model.safetensors bytes with fp32's; "
        "slimkit.json (layer specs, Huffman stream sizes) is listed beside it.\n\n"
        + table(rows)
        + "\n"
        + format_targets(checks)
    )
    print("\n" + text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    write_text(
        RESULTS / "deep_compression.json",
        json.dumps({"rows": rows, "targets": checks}, indent=2) + "\n",
    )
    write_text(RESULTS / "deep_compression.md", text)


if __name__ == "__main__":
    run()
