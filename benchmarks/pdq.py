"""Prune, distil, quantize in one recipe against each family alone, on ``digits-lenet``.

Rows: the fp32 model; the shipped ``prune-distill-quantize`` recipe; and each of its
families alone over a few settings:

- ``prune``: the recipe's prune stage alone (gradual magnitude pruning with fine-tuning
  between steps; the weights stored as nonzero values + bitmask) at several sparsities;
- ``distill``: the shipped ``distill-half`` recipe (a narrower student of the task, fp32,
  distilled from the task model) at several width multipliers;
- ``quantize``: the recipe's k-means stage alone (codebook + packed indices, centroids
  fine-tuned) at several bit widths.

Every model is saved, loaded back and evaluated loaded; size is the bytes of
``model.safetensors``. The target: at equal accuracy drop, no setting of a family alone is
as small as the combined recipe, i.e. every row of each family that drops no more than the
recipe is larger. Prints the table and targets and writes ``benchmarks/results/pdq.json``
and ``benchmarks/results/pdq.md``.

    python benchmarks/pdq.py
"""

from __future__ import annotations

import argparse
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
    format_targets,
    markdown_table,
    percent,
    row_named,
    shipped_recipe,
    target,
    write_sections,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "digits-lenet"
RECIPE = "prune-distill-quantize"
STUDENT_RECIPE = "distill-half"
FP32 = "fp32"
THREADS = 1  # training on one thread: the same figures on any machine
SECTIONS = ("lenet",)
#: family -> (the stage option swept, its values)
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "prune": ("sparsity", (0.8, 0.9, 0.95)),
    "distill": ("student_width", (0.5, 0.35, 0.25)),
    "quantize": ("bits", (4, 3, 2)),
}


# -- recipes (pure) ---------------------------------------------------------------------------
def alone(recipe: Row, kind: str, **options: Any) -> Row:
    """A recipe of ``recipe``'s ``kind`` stage alone, with ``options`` replaced."""
    stages = [s[kind] for s in recipe["stages"] if kind in s]
    if len(stages) != 1:
        raise ValueError(f"recipe {recipe['name']!r} has {len(stages)} {kind} stages, not one")
    name = "-".join([kind, *(f"{k}{v:g}" for k, v in options.items())])
    return {"name": name, "stages": [{kind: {**stages[0], **options}}]}


def family_recipes(combined: Row, student: Row) -> list[tuple[str, str, Row]]:
    """(family, setting, recipe) of every single-family row."""
    out = []
    for family, (option, values) in SWEEPS.items():
        source = student if family == "distill" else combined
        for value in values:
            recipe = alone(source, family, **{option: value})
            out.append((family, f"{option} {value:g}", recipe))
    return out


# -- table and targets (pure) -----------------------------------------------------------------
def table(rows: list[Row]) -> str:
    header = (
        "| row | family | setting | model.safetensors bytes | x smaller than fp32 | accuracy "
        "| drop (points) | seconds | note |"
    )
    body = []
    for r in rows:
        cells = [
            r["row"],
            r.get("family", "-"),
            r.get("setting", "-"),
            fmt(r.get("model_bytes"), ","),
            fmt(r.get("smaller"), ".1f"),
            percent(r.get("accuracy")),
            fmt(r.get("drop"), "+.2f"),
            fmt(r.get("seconds"), ".1f"),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def add_comparisons(rows: list[Row]) -> None:
    """Each row's drop and how many times smaller than fp32 it is."""
    base = row_named(rows, FP32)
    for r in rows:
        r["drop"] = drop_points(base, r)
        r["smaller"] = None
        if base.get("model_bytes") and r.get("model_bytes"):
            r["smaller"] = base["model_bytes"] / r["model_bytes"]


def targets(rows: list[Row]) -> list[Row]:
    """Per family: the combined recipe smaller than every row of the family alone whose drop
    is at most the recipe's (None: a row is missing)."""
    ours = row_named(rows, RECIPE)
    size, drop = ours.get("model_bytes"), ours.get("drop")
    out = []
    for family in SWEEPS:
        members = [r for r in rows if r.get("family") == family and not r.get("error")]
        text = f"{RECIPE} smaller than {family} alone at equal or smaller accuracy drop"
        if size is None or drop is None or not members:
            out.append(target(text, "not measured", None))
            continue
        within = [r for r in members if r["drop"] <= drop + 1e-9]
        if within:
            best = min(within, key=lambda r: r["model_bytes"])
            figure = (
                f"{size:,} B at {drop:+.2f} vs {family}'s smallest within that drop: "
                f"{best['setting']}, {best['model_bytes']:,} B at {best['drop']:+.2f} "
                f"({best['model_bytes'] / size:.1f}x larger)"
            )
            met = size < best["model_bytes"]
        else:
            closest = min(members, key=lambda r: r["drop"])
            figure = (
                f"no {family} setting drops as little as {drop:+.2f}; its most accurate: "
                f"{closest['setting']}, {closest['model_bytes']:,} B at {closest['drop']:+.2f}"
            )
            met = True
        out.append(target(text, figure, met))
    return out


# -- measuring ----------------------------------------------------------------------------------
def measure(task: Any, name: str, recipe: Row | None, work: Path, **extra: Any) -> Row:
    import slimkit

    row: Row = {"row": name, **extra, "note": "saved + loaded"}
    print(f"-- {TASK} {name}", flush=True)
    try:
        model = task.model()
        if recipe is not None:
            start = time.perf_counter()
            model = slimkit.compress(model, recipe, task=task)
            row["seconds"] = time.perf_counter() - start
        loaded, row["model_bytes"] = artifact_bytes(model, work / "artifact")
        row["accuracy"] = task.evaluate(loaded)["accuracy"]
    except Exception as e:  # a failing row is reported, never the end of the run
        row["error"] = error_line(e)
    return row


def lenet_section(work: Path) -> Row:
    import torch

    from slimkit.tasks import get

    task = get(TASK)
    combined, student = shipped_recipe(RECIPE), shipped_recipe(STUDENT_RECIPE)
    rows = [measure(task, FP32, None, work), measure(task, RECIPE, combined, work)]
    for family, setting, recipe in family_recipes(combined, student):
        rows.append(measure(task, recipe["name"], recipe, work, family=family, setting=setting))
    add_comparisons(rows)
    description = (
        f"torch {torch.__version__}, {THREADS} thread, seed 0 throughout (one run per row; "
        "on 450 test images one image is 0.22 points). "
        f"{RECIPE}: the shipped recipe (prune 90% gradually, distil from the fp32 model, "
        "k-means 4-bit, Huffman-code). prune rows: its prune stage alone at each sparsity "
        "(stored as nonzero values + bitmask, no encoding). quantize rows: its k-means stage "
        f"alone at each bit width. distill rows: the shipped {STUDENT_RECIPE} recipe (a "
        "narrower LeNet-5 of the task, fp32, distilled from the task model) at each width "
        "multiplier. Size: bytes of model.safetensors of the saved artifact."
    )
    return {
        "title": f"Prune, distil, quantize vs each family alone ({TASK})",
        "description": description,
        "rows": rows,
        "targets": targets(rows),
    }


def run(argv: list[str] | None = None) -> Row:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="pdq-") as tmp:
        section = lenet_section(Path(tmp))
    print("\n" + table(section["rows"]) + "\n" + format_targets(section["targets"]), flush=True)
    return write_sections(
        RESULTS,
        "pdq",
        "Prune, distil, quantize",
        {"lenet": section},
        SECTIONS,
        {"lenet": table},
    )


if __name__ == "__main__":
    run()
