"""Quantization on the digits tasks: calibrated int8, post-training vs quantization-aware
low-bit, k-means weight sharing and ternary weights.

Every row compresses the task's trained model with a shipped recipe (or a recipe derived
from one), saves it, loads it back and evaluates the loaded model on the task's test split:
top-1 accuracy, its drop in points against the fp32 model (saved and loaded the same way),
test cross-entropy, bytes on disk of the artifact and of its ``model.safetensors``, the time
of the compression call and whether the result only simulates compression. Prints the table
and the targets; writes ``benchmarks/results/quant_digits.{json,md}``.

    python benchmarks/quant_digits.py [--only ROW ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    drop_points,
    error_line,
    fmt,
    format_targets,
    markdown_table,
    percent,
    shipped_recipe,
    target,
)
from quant_minilm import dir_bytes, with_options  # noqa: E402

from slimkit.atomic import write_text  # noqa: E402

RESULTS = HERE / "results"
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "kl")
STATIC_DROP, QAT_DROP, KMEANS_DROP = 0.3, 1.0, 0.5  # targets, in points of accuracy
LOW_BITS = (4, 3, 2)  # post-training vs quantization-aware WbAb on digits-lenet
PER_TENSOR = {"granularity": "per_tensor"}


def _rows() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(task, row name, shipped recipe, option changes) of every row, fp32 rows excepted."""
    lenet = "digits-lenet"
    rows = [(lenet, f"w8a8-static/{o}", "w8a8-static", {"observer": o}) for o in OBSERVERS]
    for bits in LOW_BITS:
        static = {"bits": bits, "act_bits": bits}
        rows += [
            (lenet, f"ptq-w{bits}a{bits}/{o}", "w8a8-static", {**static, "observer": o})
            for o in OBSERVERS
        ]
        if bits == 4:  # one scale per weight tensor, as simpler post-training tools do
            rows.append((lenet, "ptq-w4a4-per-tensor", "w8a8-static", {**static, **PER_TENSOR}))
        qat = {"weight_bits": bits, "act_bits": bits}
        if bits < 4:  # fewer levels: larger steps to learn
            qat["lr"] = 1e-3
        rows.append((lenet, f"qat-w{bits}a{bits}", "qat-w4a4", qat))
    rows += [
        (lenet, "ternary-qat", "ternary-qat", {}),
        (lenet, "kmeans-4bit", "kmeans-4bit", {}),
        ("digits-mlp", "kmeans-4bit", "kmeans-4bit", {}),
        ("digits-mlp", "kmeans-3bit", "kmeans-4bit", {"bits": 3}),
        ("digits-mlp", "ptq-w4a4/minmax", "w8a8-static", {"bits": 4, "act_bits": 4}),
        ("digits-mlp", "qat-w4a4", "qat-w4a4", {}),
        ("digits-mlp", "ternary-qat", "ternary-qat", {}),
    ]
    return rows


ROWS = _rows()


# -- rows, table, targets (pure) ----------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| task | row | accuracy | drop (points) | cross-entropy | artifact bytes | "
        "model.safetensors bytes | vs fp32 | compress s | simulated | note |"
    )
    body = []
    for r in rows:
        simulated = "-" if r.get("simulated") is None else ("yes" if r["simulated"] else "no")
        body.append(
            [
                r["task"],
                r["row"],
                percent(r.get("accuracy")),
                fmt(r.get("drop"), "+.2f"),
                fmt(r.get("cross_entropy"), ".4f"),
                fmt(r.get("size_bytes"), ","),
                fmt(r.get("model_bytes"), ","),
                fmt(r.get("size_ratio"), ".3f") + ("x" if r.get("size_ratio") else ""),
                fmt(r.get("seconds"), ".1f"),
                simulated,
                r.get("error") or r.get("note", ""),
            ]
        )
    return markdown_table(head, body)


def _find(rows: list[dict[str, Any]], task: str, name: str) -> dict[str, Any] | None:
    for r in rows:
        if r["task"] == task and r["row"] == name and r.get("drop") is not None:
            return r
    return None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target: text, measured figure, met (True / False; None when its rows did not run)."""
    lenet, mlp = "digits-lenet", "digits-mlp"
    out = []
    for o in OBSERVERS:
        r = _find(rows, lenet, f"w8a8-static/{o}")
        out.append(
            target(
                f"digits-lenet w8a8-static ({o}) drops <= {STATIC_DROP} points",
                "no result" if r is None else f"{r['drop']:+.2f} points",
                None if r is None else r["drop"] <= STATIC_DROP,
            )
        )
    qat = _find(rows, lenet, "qat-w4a4")
    out.append(
        target(
            f"digits-lenet qat-w4a4 drops <= {QAT_DROP} points",
            "no result" if qat is None else f"{qat['drop']:+.2f} points",
            None if qat is None else qat["drop"] <= QAT_DROP,
        )
    )
    for bits in LOW_BITS:
        out.append(_qat_vs_ptq(rows, bits))
    km = _find(rows, mlp, "kmeans-4bit")
    out.append(
        target(
            f"digits-mlp kmeans-4bit drops <= {KMEANS_DROP} points",
            "no result" if km is None else f"{km['drop']:+.2f} points",
            None if km is None else km["drop"] <= KMEANS_DROP,
        )
    )
    for task in (lenet, mlp):
        r = _find(rows, task, "ternary-qat")
        out.append(
            target(
                f"{task} ternary-qat accuracy reported",
                "no result" if r is None else f"{100 * r['accuracy']:.2f}% ({r['drop']:+.2f})",
                None if r is None else True,
            )
        )
    return out


def _qat_vs_ptq(rows: list[dict[str, Any]], bits: int) -> dict[str, Any]:
    """QAT WbAb against every post-training WbAb row: met when each of them drops more."""
    wa = f"w{bits}a{bits}"
    text = f"digits-lenet post-training {wa.upper()} drops more than QAT {wa.upper()} (every row)"
    qat = _find(rows, "digits-lenet", f"qat-{wa}")
    ptq = [
        r
        for r in rows
        if r["task"] == "digits-lenet"
        and r["row"].startswith(f"ptq-{wa}")
        and r.get("drop") is not None
    ]
    if qat is None or not ptq:
        return target(text, "no result", None)
    figures = ", ".join(f"{r['row']} {r['drop']:+.2f}" for r in ptq)
    least = min(r["drop"] for r in ptq)
    return target(text, f"QAT {qat['drop']:+.2f} points; {figures}", least > qat["drop"])


# -- measuring ------------------------------------------------------------------------------
def recipe_for(shipped_name: str, changes: dict[str, Any], name: str) -> Any:
    from slimkit.recipe import Recipe

    return Recipe.from_dict(with_options(shipped_recipe(shipped_name), changes, name), where=name)


def measure(task: Any, name: str, recipe: Any, work: Path) -> dict[str, Any]:
    """Compress (unless ``recipe`` is None), save, load, evaluate; an error becomes the row's."""
    import torch

    import slimkit
    from slimkit.compressed import CompressedModule, is_simulated

    out: dict[str, Any] = {"task": task.name, "row": name}
    print(f"-- {task.name} {name}", flush=True)
    try:
        torch.manual_seed(0)
        model = task.model()
        start = time.perf_counter()
        if recipe is not None:
            slimkit.compress(model, recipe, task=task)
            out["seconds"] = time.perf_counter() - start
        path = slimkit.save(model, work / task.name / name.replace("/", "-"), overwrite=True)
        out["size_bytes"] = dir_bytes(path)
        out["model_bytes"] = (path / "model.safetensors").stat().st_size
        loaded = slimkit.load(path)
        shutil.rmtree(path)
        out.update(task.evaluate(loaded))
        out["simulated"] = is_simulated(loaded)
        kinds = {m.describe() for m in loaded.modules() if isinstance(m, CompressedModule)}
        out["note"] = "; ".join(sorted(kinds))
    except Exception as e:  # a failing recipe is a row, never the end of the run
        out["error"] = error_line(e)
    return out


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ROW", help="run only these row names")
    args = parser.parse_args(argv)
    import torch

    from slimkit.tasks import get

    torch.set_num_threads(2)
    chosen = [r for r in ROWS if not args.only or r[1] in args.only]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quant-digits-") as tmp:
        for task_name in dict.fromkeys(r[0] for r in chosen):
            task = get(task_name)
            base = measure(task, "fp32", None, Path(tmp))
            base["drop"], base["size_ratio"] = 0.0, 1.0
            rows.append(base)
            for _, name, shipped_name, changes in (r for r in chosen if r[0] == task_name):
                r = measure(task, name, recipe_for(shipped_name, changes, name), Path(tmp))
                r["drop"] = drop_points(base, r)
                if r.get("model_bytes") and base.get("model_bytes"):
                    r["size_ratio"] = r["model_bytes"] / base["model_bytes"]
                rows.append(r)
                print(f"   {r.get('accuracy')} {r.get('drop')} {r.get('error', '')}", flush=True)
    checks = targets(rows)
    text = (
        "# Quantization on the digits tasks\n\n"
        f"torch {torch.__version__}, 2 threads. Drop: fp32 accuracy minus the row's, in points "
        "(test split, 450 images); 'vs fp32' compares model.safetensors.\n\n"
        + table(rows)
        + "\n"
        + format_targets(checks)
    )
    result = {"rows": rows, "targets": checks}
    write_text(RESULTS / "quant_digits.json", json.dumps(result, indent=2) + "\n")
    write_text(RESULTS / "quant_digits.md", text)
    print("\n" + text)


if __name__ == "__main__":
    run()
