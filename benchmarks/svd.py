"""Low-rank factorization, in two sections (a table and its targets each):

- ``minilm``: all-MiniLM-L6-v2's FFN (``minilm-topics``) with and without a distillation
  stage after it: fp32 vs the shipped ``svd-50`` recipe (every FFN Linear factorized by
  truncated SVD at half its weights) vs ``svd-50-distill`` (the same, then the factors
  trained towards the fp32 model's embeddings on the task's unlabelled paragraphs); cosine
  of the embeddings to the fp32 model's (mean, min) and topic 1-NN accuracy;
- ``resnet``: the convolutions of ``digits-resnet``: fp32 vs the shipped ``tucker`` recipe
  (Tucker-2, at most half of each conv's weights) vs ``tucker`` followed by the shipped
  ``distill-kd`` recovery stage; test accuracy.

Per row also: parameters, MACs per example, bytes of ``model.safetensors``, latency at the
task's batch (all rows of a section timed alternately in one process, median of warm runs)
and its speedup. Every model is saved, loaded back and measured loaded. Prints each
section's table and targets; merges the sections run into ``benchmarks/results/svd.json``
and ``benchmarks/results/svd.md``.

    python benchmarks/svd.py [--section minilm resnet] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    Row,
    artifact_bytes,
    drop_points,
    error_line,
    fmt,
    markdown_table,
    percent,
    ratio,
    row_named,
    shipped_recipe,
    target,
    time_rows,
    write_sections,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "minilm-topics"
RESNET = "digits-resnet"
FP32, SVD, SVD_DISTILL = "fp32", "svd-50", "svd-50-distill"
ROWS = (FP32, SVD, SVD_DISTILL)
TUCKER, RECOVERY = "tucker", "distill-kd"
TUCKER_DISTILL = f"{TUCKER} + {RECOVERY}"
MIN_SPEEDUP = 1.1
TUCKER_TIMED = f"{TUCKER} (min_speedup {MIN_SPEEDUP:g})"
RESNET_ROWS = (FP32, TUCKER, TUCKER_DISTILL, TUCKER_TIMED)
THREADS, RUNS, WARMUP = 2, 5, 2
RESNET_RUNS = 20
SECTIONS = ("minilm", "resnet")


# -- table and targets (pure) -----------------------------------------------------------------
def table(rows: list[Row]) -> str:
    header = (
        "| row | params | MACs / example | model.safetensors bytes | size vs fp32 | latency ms "
        "| speedup | cosine mean | cosine min | 1-NN | compress s | note |"
    )
    body = []
    for r in rows:
        cells = [
            r["row"],
            fmt(r.get("params"), ","),
            fmt(r.get("macs"), ","),
            fmt(r.get("model_bytes"), ","),
            fmt(r.get("size_ratio"), ".3f"),
            fmt(r.get("latency_ms"), ".1f"),
            ratio(r.get("speedup")),
            fmt(r.get("cosine_mean"), ".5f"),
            fmt(r.get("cosine_min"), ".5f"),
            percent(r.get("knn_accuracy")),
            fmt(r.get("compress_seconds"), ".0f"),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def add_comparisons(rows: list[Row]) -> None:
    """Each row's size ratio and speedup against the fp32 row, where both are known."""
    base = row_named(rows, FP32)
    for r in rows:
        r["size_ratio"] = r["speedup"] = None
        if base.get("model_bytes") and r.get("model_bytes"):
            r["size_ratio"] = r["model_bytes"] / base["model_bytes"]
        if base.get("latency_ms") and r.get("latency_ms"):
            r["speedup"] = base["latency_ms"] / r["latency_ms"]


def targets(rows: list[Row]) -> list[Row]:
    """svd-50 really smaller and faster than fp32; distillation raises its cosine."""
    base, svd, dist = row_named(rows, FP32), row_named(rows, SVD), row_named(rows, SVD_DISTILL)
    out = []
    for key, label in (("params", "parameters"), ("macs", "MACs"), ("model_bytes", "bytes")):
        a, b = base.get(key), svd.get(key)
        out.append(
            target(
                f"{SVD} fewer {label} than fp32",
                f"{fmt(b, ',')} vs {fmt(a, ',')}",
                None if a is None or b is None else b < a,
            )
        )
    speed = svd.get("speedup")
    out.append(
        target(
            f"{SVD} faster than fp32",
            ratio(speed),
            None if speed is None else speed > 1.0,
        )
    )
    c0, c1 = svd.get("cosine_mean"), dist.get("cosine_mean")
    out.append(
        target(
            f"{SVD_DISTILL} cosine mean above {SVD}'s",
            f"{fmt(c1, '.5f')} vs {fmt(c0, '.5f')}",
            None if c0 is None or c1 is None else c1 > c0,
        )
    )
    return out


def resnet_table(rows: list[Row]) -> str:
    header = (
        "| row | params | MACs / example | model.safetensors bytes | size vs fp32 | latency ms "
        "| speedup | accuracy | drop (points) | compress s | note |"
    )
    body = []
    for r in rows:
        cells = [
            r["row"],
            fmt(r.get("params"), ","),
            fmt(r.get("macs"), ","),
            fmt(r.get("model_bytes"), ","),
            fmt(r.get("size_ratio"), ".3f"),
            fmt(r.get("latency_ms"), ".2f"),
            ratio(r.get("speedup")),
            percent(r.get("accuracy")),
            fmt(r.get("drop"), "+.2f"),
            fmt(r.get("compress_seconds"), ".0f"),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def resnet_targets(rows: list[Row]) -> list[Row]:
    """Tucker really shrinks the convs: parameters, MACs, bytes and latency all fall; with
    ``min_speedup`` at least latency does."""
    base, ours = row_named(rows, FP32), row_named(rows, TUCKER)
    timed = row_named(rows, TUCKER_TIMED)
    out = []
    for key, label in (("params", "parameters"), ("macs", "MACs"), ("model_bytes", "bytes")):
        a, b = base.get(key), ours.get(key)
        met = None if a is None or b is None else b < a
        out.append(
            target(f"{TUCKER} fewer {label} than fp32", f"{fmt(b, ',')} vs {fmt(a, ',')}", met)
        )
    for name, row in ((TUCKER, ours), (TUCKER_TIMED, timed)):
        speed = row.get("speedup")
        met = None if speed is None else speed > 1.0
        out.append(target(f"{name} faster than fp32", ratio(speed), met))
    return out


TABLES = {"minilm": table, "resnet": resnet_table}


# -- measuring ----------------------------------------------------------------------------------
def recipe_for(name: str) -> Row:
    """The shipped recipe of a row; ``a + b``: the stages of both, in order; the timed
    Tucker row: ``tucker`` keeping only layers measured ``MIN_SPEEDUP`` times faster."""
    if name == TUCKER_TIMED:
        ((kind, stage),) = shipped_recipe(TUCKER)["stages"][0].items()
        timed = {kind: {**stage, "min_speedup": MIN_SPEEDUP}}
        return {"name": f"{TUCKER}-timed", "stages": [timed]}
    parts = [shipped_recipe(part) for part in name.split(" + ")]
    return {"name": name.replace(" + ", "-"), "stages": [s for r in parts for s in r["stages"]]}


def _build(task: Any, name: str, work: Path) -> tuple[Row, Any]:
    import slimkit
    from slimkit.compressed import count_params
    from slimkit.evaluate.macs import count_macs

    row: Row = {"row": name, "note": "saved + loaded"}
    print(f"-- {task.name} {name}", flush=True)
    try:
        model = task.model()
        if name != FP32:
            start = time.perf_counter()
            model = slimkit.compress(model, recipe_for(name), task=task)
            row["compress_seconds"] = time.perf_counter() - start
        loaded, row["model_bytes"] = artifact_bytes(model, work / "artifact")
        row.update(task.evaluate(loaded))
        row["params"] = count_params(loaded)
        row["macs"] = count_macs(loaded, task.example_inputs())
        return row, loaded
    except Exception as e:  # a failing row is reported, never the end of the run
        row["error"] = error_line(e)
        return row, None


def _timed_rows(
    task: Any, names: tuple[str, ...], work: Path, runs: int
) -> tuple[list[Row], float]:
    """Build, save, reload and evaluate every row, then time the models alternately; the
    rows and the highest 1-minute load average seen."""

    built = [_build(task, name, work) for name in names]
    timed = [(row, m) for row, m in built if m is not None]
    load = time_rows(timed, task.latency_inputs(), runs, WARMUP, THREADS)
    rows = [row for row, _ in built]
    add_comparisons(rows)
    return rows, load


def minilm_section(work: Path, runs: int) -> Row:
    import torch

    from slimkit.tasks import get

    task = get(TASK)
    rows, load = _timed_rows(task, ROWS, work, runs)
    (distill,) = [s["distill"] for s in shipped_recipe(SVD_DISTILL)["stages"] if "distill" in s]
    description = (
        f"torch {torch.__version__}. {SVD}: the shipped recipe, every encoder layer's "
        "intermediate.dense and FFN output.dense Linear as two Linear layers from its truncated "
        f"SVD at half the layer's weights, no training. {SVD_DISTILL}: the same, then a "
        f"distill stage (loss {distill['loss']}, {distill['embedding_kind']}, teacher "
        f"{distill['teacher']}: the fp32 model; {distill['epochs']} epochs of Adam at "
        f"{distill['lr']}, {distill['lr_schedule']}) on the task's unlabelled calibration "
        "paragraphs, disjoint from the evaluation ones. Cosine: to the fp32 model's embeddings "
        "of the evaluation paragraphs; 1-NN: leave-one-out topic accuracy. Latency: median of "
        f"{runs} warm runs, {task.latency_description()}, {THREADS} threads, the rows timed "
        f"alternately in one process; the 1-minute load average reached {load:.1f} on this "
        f"{os.cpu_count()}-core machine. Bytes: model.safetensors of the saved artifact."
    )
    return {
        "title": f"SVD of the FFN of all-MiniLM-L6-v2 ({TASK}), with and without distillation",
        "description": description,
        "rows": rows,
        "targets": targets(rows),
    }


def resnet_section(work: Path, runs: int) -> Row:
    import torch

    from slimkit.tasks import get

    task = get(RESNET)
    rows, load = _timed_rows(task, RESNET_ROWS, work, runs)
    base = row_named(rows, FP32)
    for r in rows:
        r["drop"] = drop_points(base, r)
    (distill,) = [s["distill"] for s in shipped_recipe(RECOVERY)["stages"]]
    description = (
        f"torch {torch.__version__}. {TUCKER}: the shipped recipe, every Conv2d with a kxk "
        "kernel as 1x1 -> kxk core -> 1x1 from its Tucker-2 decomposition (HOSVD + 5 HOOI "
        "sweeps) at most half the layer's weights (depthwise and grouped convs, and convs "
        f"that would not shrink, left as they are), no training. {TUCKER_DISTILL}: then the "
        f"shipped {RECOVERY} stage (T {distill['temperature']}, alpha {distill['alpha']}, "
        f"{distill['epochs']} epochs at {distill['lr']}, teacher: the fp32 model) on the "
        f"task's labelled training data. {TUCKER_TIMED}: {TUCKER} swapping in only the "
        f"layers timed at least {MIN_SPEEDUP:g}x faster than the conv they replace, on its "
        "own input from the latency batch (no training). Accuracy on the 450 test images. "
        "Latency: median of "
        f"{runs} warm runs, {task.latency_description()}, {THREADS} threads, the rows timed "
        f"alternately in one process; the 1-minute load average reached {load:.1f} on this "
        f"{os.cpu_count()}-core machine. Bytes: model.safetensors of the saved artifact."
    )
    return {
        "title": f"Tucker-2 factorization of the convolutions of {RESNET}",
        "description": description,
        "rows": rows,
        "targets": resnet_targets(rows),
    }


def run(argv: list[str] | None = None) -> Row:
    from _common import format_targets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--runs", type=int, default=None, help="timed runs per model")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    runners = {"minilm": (minilm_section, RUNS), "resnet": (resnet_section, RESNET_RUNS)}
    new = {}
    with tempfile.TemporaryDirectory(prefix="svd-") as tmp:
        for name in args.section:
            section_of, runs = runners[name]
            new[name] = section = section_of(Path(tmp), args.runs or runs)
            print(
                "\n" + TABLES[name](section["rows"]) + "\n" + format_targets(section["targets"]),
                flush=True,
            )
    return write_sections(RESULTS, "svd", "Low-rank factorization", new, SECTIONS, TABLES)


if __name__ == "__main__":
    run()
