"""Distillation into smaller students the task defines, in two sections (a table and its
targets each):

- ``lenet``: the half-width LeNet-5 student of ``digits-lenet`` (every conv and hidden FC
  width halved, random init) over several seeds (student init and data order both follow
  the seed): distilled from the task model (the shipped ``distill-half`` recipe) vs the same
  student, epochs and learning rate on the hard labels alone (``alpha: 0``); accuracy per
  seed, mean, standard deviation, min and max, and the parameters of teacher and student.
- ``minilm``: the 3-layer student of ``minilm-topics`` (every other encoder layer of
  all-MiniLM-L6-v2, 0, 2 and 4, initialised from the teacher) before and after distillation
  of its mean-pooled embeddings (cosine) on the task's unlabelled calibration paragraphs
  (the shipped ``distill-minilm-3l`` recipe), beside the teacher: layers, parameters, cosine
  to the teacher's embeddings (mean, min), topic 1-NN accuracy and latency at the task's
  batch, the models timed alternately in one process, and the speedup.

Every model is saved, loaded back and measured loaded. Prints each section's table and
targets; merges the sections run into ``benchmarks/results/distill.json`` and
``benchmarks/results/distill.md`` (the other sections' saved results are kept).

    python benchmarks/distill.py [--section lenet minilm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import (
    error_line,
    fmt,
    format_targets,
    markdown_table,
    merge_sections,
    percent,
    ratio,
    render_sections,
    round_trip,
    row_named,
    shipped_recipe,
    target,
    time_rows,
    write_sections,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SECTIONS = ("lenet", "minilm")
TITLE = "Distillation into smaller students"
THREADS = 2
# lenet section
LENET = "digits-lenet"
LENET_RECIPE = "distill-half"
SEEDS = (0, 1, 2, 3, 4)
TEACHER, DISTILLED, HARD = "teacher (fp32)", "half-width, distilled", "half-width, hard labels"
# minilm section
MINILM = "minilm-topics"
MINILM_RECIPE = "distill-minilm-3l"
STUDENT_BEFORE, STUDENT_AFTER = "3-layer, before distillation", "3-layer, distilled"
RUNS, WARMUP = 5, 2
# targets
COSINE, SPEEDUP = 0.95, 1.5


# -- numbers, tables and targets (pure) -------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max of ``values``; Nones
    for none."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def seed_row(name: str, accuracies: Sequence[float], **extra: Any) -> dict[str, Any]:
    """A lenet row: the per-seed accuracies and their spread."""
    return {"row": name, "accuracies": list(accuracies), **spread(accuracies), **extra}


def add_comparisons(rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
    """Each row's parameters as a fraction of ``base``'s and, where both were timed, the
    speedup (base latency / the row's)."""
    for r in rows:
        r["params_ratio"] = r["speedup"] = None
        if base.get("params") and r.get("params"):
            r["params_ratio"] = r["params"] / base["params"]
        if base.get("latency_ms") and r.get("latency_ms"):
            r["speedup"] = base["latency_ms"] / r["latency_ms"]


def lenet_table(rows: list[dict[str, Any]]) -> str:
    header = "| row | params | vs teacher | accuracy per seed | mean | std | min | max | note |"
    body = []
    for r in rows:
        per_seed = " / ".join(percent(a) for a in r.get("accuracies") or [])
        cells = [
            r["row"],
            fmt(r.get("params"), ","),
            ratio(r.get("params_ratio")),
            per_seed or "-",
            percent(r.get("mean")),
            percent(r.get("std")),
            percent(r.get("min")),
            percent(r.get("max")),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def minilm_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| row | layers | params | vs teacher | cosine mean | cosine min | 1-NN | latency ms "
        "| speedup | note |"
    )
    body = []
    for r in rows:
        cells = [
            r["row"],
            fmt(r.get("layers"), "d"),
            fmt(r.get("params"), ","),
            ratio(r.get("params_ratio")),
            fmt(r.get("cosine_mean"), ".4f"),
            fmt(r.get("cosine_min"), ".4f"),
            percent(r.get("knn_accuracy")),
            fmt(r.get("latency_ms"), ".1f"),
            ratio(r.get("speedup")),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def lenet_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distilled student's mean accuracy over the seeds above the hard-label one's."""
    soft, hard = row_named(rows, DISTILLED), row_named(rows, HARD)
    a, b = soft.get("mean"), hard.get("mean")
    gap = None if a is None or b is None else 100 * (a - b)
    figure = (
        f"{percent(a)} vs {percent(b)} ({fmt(gap, '+.2f')} points; std "
        f"{percent(soft.get('std'))} vs {percent(hard.get('std'))}, "
        f"{soft.get('n', 0)} and {hard.get('n', 0)} seeds)"
    )
    return [
        target(
            "distilled mean accuracy > hard-label mean", figure, None if gap is None else gap > 0
        )
    ]


def minilm_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distilled 3-layer student's cosine to the teacher and its speedup."""
    ours = row_named(rows, STUDENT_AFTER)
    cosine, speedup = ours.get("cosine_mean"), ours.get("speedup")
    return [
        target(
            f"{STUDENT_AFTER} cosine mean to the teacher >= {COSINE:g}",
            f"{fmt(cosine, '.4f')} (min {fmt(ours.get('cosine_min'), '.4f')})",
            None if cosine is None else cosine >= COSINE,
        ),
        target(
            f"{STUDENT_AFTER} latency >= {SPEEDUP:g}x faster than the teacher",
            f"{ratio(speedup)} ({fmt(ours.get('latency_ms'), '.1f')} ms)",
            None if speedup is None else speedup >= SPEEDUP,
        ),
    ]


#: section -> its table function
TABLES: dict[str, Callable[[list[dict[str, Any]]], str]] = {
    "lenet": lenet_table,
    "minilm": minilm_table,
}


def merge(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Saved results with the sections in ``new`` replaced, in section order."""
    return merge_sections(saved, new, SECTIONS)


def render(results: dict[str, Any]) -> str:
    """The markdown of every section in ``results``: title, description, table, targets."""
    return render_sections(TITLE, results, TABLES)


def with_stage(recipe: dict[str, Any], **options: Any) -> dict[str, Any]:
    """``recipe`` (a dict of one distill stage) with the stage's ``options`` replaced."""
    ((kind, fields),) = recipe["stages"][0].items()
    if kind != "distill" or len(recipe["stages"]) != 1:
        raise ValueError(f"recipe {recipe['name']!r} is not a single distill stage")
    return {**recipe, "stages": [{kind: {**fields, **options}}]}


# -- measuring --------------------------------------------------------------------------------
def lenet_section(work: Path) -> dict[str, Any]:
    import torch

    import slimkit
    from slimkit.compressed import count_params
    from slimkit.tasks import get

    task = get(LENET)
    shipped = shipped_recipe(LENET_RECIPE)
    rows: list[dict[str, Any]] = []
    print(f"-- {LENET} {TEACHER}", flush=True)
    teacher = round_trip(task.model(), work / "teacher")
    accuracy = task.evaluate(teacher)["accuracy"]
    rows.append(seed_row(TEACHER, [accuracy], params=count_params(teacher), note="saved + loaded"))
    seconds: dict[str, list[float]] = {DISTILLED: [], HARD: []}
    for name, alpha in ((DISTILLED, None), (HARD, 0.0)):
        accuracies, params, error = [], None, None
        for seed in SEEDS:
            print(f"-- {LENET} {name} seed {seed}", flush=True)
            options: dict[str, Any] = {"seed": seed}
            if alpha is not None:
                options["alpha"] = alpha
            try:
                start = time.perf_counter()
                student = slimkit.compress(task.model(), with_stage(shipped, **options), task=task)
                seconds[name].append(time.perf_counter() - start)
                loaded = round_trip(student, work / f"student-{seed}")
                accuracies.append(task.evaluate(loaded)["accuracy"])
                params = count_params(loaded)
            except Exception as e:  # a failing seed is reported, never the end of the run
                error = error_line(e)
        mean_s = statistics.fmean(seconds[name] or [0.0])
        note = f"{len(accuracies)} seeds, saved + loaded; {mean_s:.1f} s each"
        rows.append(seed_row(name, accuracies, params=params, note=note, error=error))
    add_comparisons(rows, row_named(rows, TEACHER))
    (stage,) = [s["distill"] for s in shipped["stages"]]
    description = (
        f"torch {torch.__version__}, {THREADS} threads. The student: {LENET}'s LeNet-5 with "
        "every hidden width halved (conv 16/32 -> 8/16 channels, FC 120/84 -> 60/42; the "
        f"10 outputs kept), randomly initialised. {DISTILLED}: the shipped {LENET_RECIPE} "
        f"recipe (teacher {stage['teacher']}, the trained task model; loss {stage['loss']}, "
        f"T {stage['temperature']}, alpha {stage['alpha']}; {stage['epochs']} epochs of Adam "
        f"at {stage['lr']}, {stage['lr_schedule']}). {HARD}: the same stage with alpha 0 "
        "(cross-entropy on the labels only), same epochs and learning rate. Seeds "
        f"{', '.join(map(str, SEEDS))}: the student's initialisation and the batch order. "
        "Accuracy on the 450 test images; std is the sample standard deviation over the seeds."
    )
    return {
        "title": f"Half-width LeNet-5 student ({LENET})",
        "description": description,
        "rows": rows,
        "targets": lenet_targets(rows),
    }


def _layers(model: Any) -> int | None:
    layer = getattr(getattr(model, "encoder", None), "layer", None)
    return None if layer is None else len(layer)


def minilm_section(work: Path) -> dict[str, Any]:
    import torch

    import slimkit
    from slimkit.compressed import count_params
    from slimkit.model_info import set_info
    from slimkit.tasks import get

    task = get(MINILM)
    shipped = shipped_recipe(MINILM_RECIPE)
    (stage,) = [s["distill"] for s in shipped["stages"]]
    built: list[tuple[dict[str, Any], Any]] = []
    messages: list[str] = []
    for name in ("teacher (fp32)", STUDENT_BEFORE, STUDENT_AFTER):
        row: dict[str, Any] = {"row": name, "note": "saved + loaded"}
        print(f"-- {MINILM} {name}", flush=True)
        try:
            if name == STUDENT_AFTER:
                start = time.perf_counter()
                model = slimkit.compress(task.model(), shipped, task=task, progress=messages.append)
                row["train_seconds"] = time.perf_counter() - start
                summary = [m for m in messages if m.startswith("distill:")]
                done = summary[-1] if summary else "distill"
                row["note"] = f"{done}; {row['train_seconds']:.0f} s; saved + loaded"
            elif name == STUDENT_BEFORE:
                options = {
                    "width": 1.0,
                    "depth": stage["student_depth"],
                    "init": "teacher",
                    "seed": 0,
                }
                model = task.student(**options)
                set_info(model, source=task.source(), student=options)
            else:
                model = task.model()
            loaded = round_trip(model, work / "minilm")
            row.update(task.evaluate(loaded))
            row["layers"] = _layers(loaded)
            row["params"] = count_params(loaded)
            built.append((row, loaded))
        except Exception as e:  # a failing row is reported, never the end of the run
            row["error"] = error_line(e)
            built.append((row, None))
    timed = [(row, m) for row, m in built if m is not None]
    load = time_rows(timed, task.latency_inputs(), RUNS, WARMUP, THREADS)
    rows = [row for row, _ in built]
    add_comparisons(rows, row_named(rows, "teacher (fp32)"))
    description = (
        f"torch {torch.__version__}. The student: all-MiniLM-L6-v2 keeping encoder layers 0, "
        "2 and 4 of 6 (every other layer), initialised from the teacher's weights. "
        f"{STUDENT_AFTER}: the shipped {MINILM_RECIPE} recipe: loss {stage['loss']} "
        f"({stage['embedding_kind']}: 1 - cosine of the mask-mean-pooled, normalised "
        "embeddings) towards the teacher's on the task's unlabelled calibration paragraphs "
        f"(a quarter of the pydoc topic paragraphs, disjoint from the evaluation ones), "
        f"{stage['epochs']} epochs of Adam at {stage['lr']}, {stage['lr_schedule']}, "
        f"val_fraction {stage['val_fraction']}. Cosine: to the fp32 teacher's embeddings of "
        "the evaluation paragraphs; 1-NN: leave-one-out topic accuracy. Latency: median of "
        f"{RUNS} warm runs, {task.latency_description()}, {THREADS} threads, all rows timed "
        "alternately in one process; the 1-minute load average reached "
        f"{load:.1f} on this {os.cpu_count()}-core machine (other work may have shared it)."
    )
    return {
        "title": f"3-layer MiniLM student ({MINILM})",
        "description": description,
        "rows": rows,
        "targets": minilm_targets(rows),
    }


RUNNERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "lenet": lenet_section,
    "minilm": minilm_section,
}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    new = {}
    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        for name in args.section:
            section = RUNNERS[name](Path(tmp))
            new[name] = section
            print(
                "\n" + TABLES[name](section["rows"]) + "\n" + format_targets(section["targets"]),
                flush=True,
            )
    return write_sections(RESULTS, "distill", TITLE, new, SECTIONS, TABLES)


if __name__ == "__main__":
    run()
