"""Depthwise-separable convolutions on ``digits-resnet``: fp32 vs the separable stage alone
(least-squares fit, no recovery) vs the shipped ``separable`` recipe (with its fine-tuning
recovery): conv parameters, total parameters, MACs per example, accuracy and its drop.

Every model is saved, loaded back and measured loaded. Prints the table and the targets and
writes ``benchmarks/results/separable.json`` and ``benchmarks/results/separable.md``.

    python benchmarks/separable.py
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
    error_line,
    fmt,
    format_targets,
    markdown_table,
    percent,
    ratio,
    round_trip,
    row_named,
    shipped_recipe,
    target,
)

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "digits-resnet"
RECIPE = "separable"
FIT_ONLY = "separable-fit-only"
THREADS = 2
# targets
FEWER_CONV, DROP = 3.0, 1.0  # x fewer conv parameters, accuracy points


# -- tables and targets (pure) ------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| row | conv params | vs fp32 | params | MACs / example | mean fit error | accuracy "
        "| drop (points) | note |"
    )
    body = []
    for r in rows:
        cells = [
            r["row"],
            fmt(r.get("conv_params"), ","),
            ratio(r.get("conv_fewer")),
            fmt(r.get("params"), ","),
            fmt(r.get("macs"), ","),
            fmt(r.get("mean_fit_error"), ".4f"),
            percent(r.get("accuracy")),
            fmt(r.get("drop"), "+.2f"),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def add_comparisons(rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
    """Fill each row's accuracy drop (points) and conv-parameter ratio against ``base``."""
    for r in rows:
        r["drop"] = drop_points(base, r)
        r["conv_fewer"] = None
        if base.get("conv_params") and r.get("conv_params"):
            r["conv_fewer"] = base["conv_params"] / r["conv_params"]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recipe's conv parameters against fp32's, and its accuracy drop after recovery."""
    base, ours = row_named(rows, "fp32"), row_named(rows, RECIPE)
    fewer = ours.get("conv_fewer") if base else None
    drop = ours.get("drop") if base else None
    return [
        target(
            f"{RECIPE} conv parameters >= {FEWER_CONV:g}x fewer than fp32",
            f"{ratio(fewer)} ({fmt(ours.get('conv_params'), ',')} vs "
            f"{fmt(base.get('conv_params'), ',')})",
            None if fewer is None else fewer >= FEWER_CONV,
        ),
        target(
            f"{RECIPE} accuracy drop <= {DROP:g} point after recovery",
            f"{fmt(drop, '+.2f')} points",
            None if drop is None else drop <= DROP,
        ),
    ]


def without_finetune(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe (as a dict) without its recovery stages, under a name of its own."""
    stages = [s for s in recipe["stages"] if "finetune" not in s and "distill" not in s]
    if len(stages) == len(recipe["stages"]):
        raise ValueError(f"recipe {recipe['name']!r} has no recovery stage")
    return {"name": FIT_ONLY, "stages": stages}


def render(results: dict[str, Any]) -> str:
    return (
        f"# Depthwise-separable convolutions ({TASK})\n\n{results['description']}\n\n"
        + table(results["rows"])
        + "\n"
        + format_targets(results["targets"])
    )


# -- measuring ----------------------------------------------------------------------------
def conv_params(model: Any) -> int:
    """Parameters of every Conv2d of ``model`` (the depthwise and pointwise halves of a
    SeparableConv2d included)."""
    from torch import nn

    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
        for p in m.parameters(recurse=False)
    )


def measure(task: Any, name: str, recipe: dict[str, Any] | None, note: str, work: Path) -> dict:
    """Compress (unless ``recipe`` is None), save, load, measure; an error becomes the row's."""
    import torch

    import slimkit
    from slimkit.compressed import count_params
    from slimkit.evaluate.macs import count_macs
    from slimkit.separable.stage import SeparableConv2d

    out: dict[str, Any] = {"row": name, "note": note}
    print(f"-- {TASK} {name}", flush=True)
    try:
        torch.manual_seed(0)
        model = task.model()
        if recipe is not None:
            start = time.perf_counter()
            slimkit.compress(model, recipe, task=task)
            out["seconds"] = time.perf_counter() - start
        loaded = round_trip(model, work / name)
        out.update(task.evaluate(loaded))
        out["conv_params"] = conv_params(loaded)
        out["params"] = count_params(loaded)
        out["macs"] = count_macs(loaded, task.example_inputs())
        errors = {
            n: m.fit_error
            for n, m in loaded.named_modules()
            if isinstance(m, SeparableConv2d) and m.fit_error is not None
        }
        if errors:
            out["fit_errors"] = errors
            out["mean_fit_error"] = sum(errors.values()) / len(errors)
    except Exception as e:  # a failing row is reported, never the end of the run
        out["error"] = error_line(e)
    return out


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    import torch

    import slimkit.separable.stage  # noqa: F401  (registers the stage)
    from slimkit.tasks import get

    torch.set_num_threads(THREADS)
    task = get(TASK)
    shipped = shipped_recipe(RECIPE)
    plan: list[tuple[str, dict[str, Any] | None, str]] = [
        ("fp32", None, "saved + loaded"),
        (FIT_ONLY, without_finetune(shipped), "least-squares fit, no recovery; saved + loaded"),
        (RECIPE, shipped, "shipped recipe (fit + recovery); saved + loaded"),
    ]
    with tempfile.TemporaryDirectory(prefix="separable-") as tmp:
        rows = [measure(task, name, recipe, note, Path(tmp)) for name, recipe, note in plan]
    add_comparisons(rows, row_named(rows, "fp32"))
    recovery = ", ".join(
        f"{kind} {f.get('method')}: {f.get('epochs')} epochs at lr {f.get('lr')} "
        f"({f.get('lr_schedule')})"
        for s in shipped["stages"]
        for kind, f in s.items()
        if kind in ("finetune", "distill")
    )
    description = (
        f"torch {torch.__version__}, {THREADS} threads. {FIT_ONLY}: the {RECIPE} recipe's "
        "separable stage alone (every standard Conv2d with a kernel >= 3x3 replaced by a "
        "depthwise + pointwise pair, depth multiplier 1, fitted by a truncated SVD per input "
        f"channel). {RECIPE}: the shipped recipe, then its recovery stage "
        f"({recovery}). Conv params: every Conv2d's parameters; params: slimkit's count; "
        "MACs per example (slimkit's counter); mean fit error: mean relative Frobenius error "
        "of the fitted layers' kernels before training. Drop: fp32 accuracy minus the row's "
        "(450 test images)."
    )
    results = {
        "description": description,
        "rows": rows,
        "targets": targets(rows),
    }
    print("\n" + table(rows) + "\n" + format_targets(results["targets"]), flush=True)
    write_text(RESULTS / "separable.json", json.dumps(results, indent=2) + "\n")
    write_text(RESULTS / "separable.md", render(results))
    return results


if __name__ == "__main__":
    run()
