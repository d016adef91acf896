"""Pruning benchmarks, in three sections (one table and its targets each):

- ``minilm``: all-MiniLM-L6-v2 (``minilm-topics``), magnitude vs Wanda vs SparseGPT at 50%
  unstructured and 2:4, one shot on every Linear layer: cosine of the mean-pooled embeddings
  to fp32 (mean, min), topic 1-NN accuracy, bytes on disk, time of the pruning call.
- ``heads``: all-MiniLM-L6-v2, the ``heads-ffn`` recipe (2 of 12 heads per layer and 30% of
  the FFN neurons removed physically): parameters, MACs, bytes on disk, latency timed
  alternately against fp32 in one process, speedup, cosine to fp32 and 1-NN accuracy.
- ``resnet``: ``digits-resnet``, side by side in one run: fp32, slimkit's ``structured-50``
  recipe and Torch-Pruning at the same channel ratio (L1 magnitude, final Linear ignored)
  followed by the same fine-tuning stage: parameters, MACs per example, CPU latency timed
  alternately against fp32 in one process, speedup, accuracy and its drop.
- ``lenet``: the ``unstructured-90`` recipe on ``digits-lenet`` (and ``digits-mlp`` for
  information): accuracy, drop, ``model.safetensors`` bytes against fp32's.

Every slimkit model is saved, loaded back and measured loaded. Prints each section's table and
targets; merges the sections run into ``benchmarks/results/prune.json`` (the other sections'
saved results are kept) and writes ``benchmarks/results/prune.md`` from all of them.

    python benchmarks/prune.py [--section minilm heads resnet lenet] [--only ROW ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    drop_points,
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
)

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SECTIONS = ("minilm", "heads", "resnet", "lenet")
TITLE = "Pruning benchmarks"
TASK = "minilm-topics"
RESNET = "digits-resnet"
STRUCTURED, UNSTRUCTURED, HEADS = "structured-50", "unstructured-90", "heads-ffn"
PEER = "torch-pruning-50"
LATENCY_BATCH, THREADS, RUNS, WARMUP = 256, 2, 20, 3
# targets
FEWER, SPEEDUP, RESNET_DROP = 2.0, 1.6, 1.0  # x fewer params/MACs, x faster, points
LENET_DROP, LENET_SIZE = 0.5, 0.25  # points, x fp32's model.safetensors bytes
HEADS_RUNS = 10  # minilm forward passes are long

#: row name -> the prune stage's options (minilm section)
ROWS: dict[str, dict[str, Any]] = {
    "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    "wanda-50": {"method": "unstructured", "criterion": "wanda", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "magnitude-2:4": {"method": "nm", "n": 2, "m": 4, "criterion": "magnitude"},
    "wanda-2:4": {"method": "nm", "n": 2, "m": 4, "criterion": "wanda"},
    "sparsegpt-2:4": {"method": "sparsegpt", "n": 2, "m": 4},
}


# -- tables and targets (pure) ------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| row | cos mean | cos min | 1-NN | size bytes | prune s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {fmt(r.get('cosine_mean'), '.5f')} | "
            f"{fmt(r.get('cosine_min'), '.5f')} | {fmt(r.get('knn_accuracy'), '.4f')} | "
            f"{fmt(r.get('size_bytes'), ',')} | {fmt(r.get('seconds'), '.1f')} | "
            f"{r.get('error', '')} |"
        )
    return "\n".join(lines) + "\n"


def resnet_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| row | params | MACs / example | latency ms (median) | speedup | accuracy | "
        "drop (points) | note |"
    )
    body = []
    for r in rows:
        cells = [
            r["row"],
            fmt(r.get("params"), ","),
            fmt(r.get("macs"), ","),
            fmt(r.get("latency_ms"), ".2f"),
            ratio(r.get("speedup")),
            percent(r.get("accuracy")),
            fmt(r.get("drop"), "+.2f"),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def heads_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| row | params | MACs / example | bytes on disk | latency ms | speedup | cos mean "
        "| cos min | 1-NN | prune s | note |"
    )
    body = []
    for r in rows:
        cells = [
            r["row"],
            fmt(r.get("params"), ","),
            fmt(r.get("macs"), ","),
            fmt(r.get("size_bytes"), ","),
            fmt(r.get("latency_ms"), ".1f"),
            ratio(r.get("speedup")),
            fmt(r.get("cosine_mean"), ".5f"),
            fmt(r.get("cosine_min"), ".5f"),
            fmt(r.get("knn_accuracy"), ".4f"),
            fmt(r.get("seconds"), ".1f"),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def heads_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """heads-ffn: heads and neurons removed physically (fewer parameters), speedup and
    cosine measured (reported; the issue sets no bar for them)."""
    base, r = _row(rows, "fp32"), _row(rows, HEADS)
    fewer = _fewer(base, r, "params")
    return [
        target(
            f"minilm-topics {HEADS}: 2 of 12 heads and 30% of FFN neurons removed physically",
            f"{fmt(fewer, '.3f')}x fewer parameters ({fmt(r.get('params'), ',')})",
            None if fewer is None else fewer > 1.0,
        ),
        target(
            f"minilm-topics {HEADS}: speedup and cosine measured",
            f"{ratio(r.get('speedup'))}, cos mean {fmt(r.get('cosine_mean'), '.5f')}",
            None if r.get("speedup") is None or r.get("cosine_mean") is None else True,
        ),
    ]


def lenet_table(rows: list[dict[str, Any]]) -> str:
    header = "| task | row | accuracy | drop (points) | model.safetensors bytes | vs fp32 | note |"
    body = []
    for r in rows:
        cells = [
            r["task"],
            r["row"],
            percent(r.get("accuracy")),
            fmt(r.get("drop"), "+.2f"),
            fmt(r.get("model_bytes"), ","),
            fmt(r.get("size_ratio"), ".3f") + ("x" if r.get("size_ratio") is not None else ""),
            r.get("error") or r.get("note", ""),
        ]
        body.append(cells)
    return markdown_table(header, body)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SparseGPT's cosine mean above magnitude's, at 50% and at 2:4 (None: rows missing)."""
    cos = {r["row"]: r.get("cosine_mean") for r in rows}
    out = []
    for setting in ("50", "2:4"):
        s, m = cos.get(f"sparsegpt-{setting}"), cos.get(f"magnitude-{setting}")
        met = None if s is None or m is None else s > m
        figure = f"sparsegpt {fmt(s, '.5f')} vs magnitude {fmt(m, '.5f')}"
        out.append(target(f"SparseGPT beats magnitude at {setting}", figure, met))
    return out


def _row(rows: list[dict[str, Any]], name: str, task: str | None = None) -> dict[str, Any]:
    """The row called ``name`` (of ``task`` when given) without error; {} when there is none."""
    return row_named([r for r in rows if r.get("task", task) == task], name)


def _fewer(base: dict[str, Any], r: dict[str, Any], key: str) -> float | None:
    """How many times fewer ``key`` the row has than the baseline (None: either missing)."""
    if not base.get(key) or not r.get(key):
        return None
    return base[key] / r[key]


def _at_least(value: float | None, bar: float) -> bool | None:
    return None if value is None else value >= bar


def _at_most(value: float | None, bar: float) -> bool | None:
    return None if value is None else value <= bar


def resnet_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """structured-50 against fp32 (params, MACs, speedup, drop) and against Torch-Pruning."""
    base, ours, peer = _row(rows, "fp32"), _row(rows, STRUCTURED), _row(rows, PEER)
    out = []
    for key, label in (("params", "parameters"), ("macs", "MACs")):
        fewer = _fewer(base, ours, key)
        figure = f"{ratio(fewer)} ({fmt(ours.get(key), ',')} vs {fmt(base.get(key), ',')})"
        out.append(
            target(
                f"{STRUCTURED} {label} >= {FEWER:g}x fewer than fp32",
                figure,
                _at_least(fewer, FEWER),
            )
        )
    speedup = ours.get("speedup")
    out.append(
        target(
            f"{STRUCTURED} latency >= {SPEEDUP:g}x faster than fp32 (batch {LATENCY_BATCH}, "
            f"{THREADS} threads)",
            f"{ratio(speedup)} ({fmt(ours.get('latency_ms'), '.2f')} vs "
            f"{fmt(base.get('latency_ms'), '.2f')} ms)",
            _at_least(speedup, SPEEDUP),
        )
    )
    drop = ours.get("drop")
    out.append(
        target(
            f"{STRUCTURED} accuracy drop <= {RESNET_DROP:g} point",
            f"{fmt(drop, '+.2f')} points",
            _at_most(drop, RESNET_DROP),
        )
    )
    a, b = ours.get("accuracy"), peer.get("accuracy")
    out.append(
        target(
            f"{STRUCTURED} accuracy no worse than Torch-Pruning at the same ratio and budget",
            f"slimkit {percent(a)} vs torch-pruning {percent(b)}",
            None if a is None or b is None else a >= b,
        )
    )
    return out


def lenet_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """digits-lenet unstructured-90: accuracy drop and model.safetensors size against fp32."""
    r = _row(rows, UNSTRUCTURED, "digits-lenet")
    drop, size_ratio = r.get("drop"), r.get("size_ratio")
    return [
        target(
            f"digits-lenet {UNSTRUCTURED} accuracy drop <= {LENET_DROP:g} points",
            f"{fmt(drop, '+.2f')} points",
            _at_most(drop, LENET_DROP),
        ),
        target(
            f"digits-lenet {UNSTRUCTURED} model.safetensors <= {LENET_SIZE:g}x fp32's",
            f"{fmt(size_ratio, '.3f')}x ({fmt(r.get('model_bytes'), ',')} bytes)",
            _at_most(size_ratio, LENET_SIZE),
        ),
    ]


def add_comparisons(rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
    """Fill each row's drop, speedup and size ratio against ``base`` where both are known."""
    for r in rows:
        r["drop"] = drop_points(base, r)
        if r.get("latency_ms") and base.get("latency_ms"):
            r["speedup"] = base["latency_ms"] / r["latency_ms"]
        if r.get("model_bytes") and base.get("model_bytes"):
            r["size_ratio"] = r["model_bytes"] / base["model_bytes"]


#: section -> its table function
TABLES: dict[str, Callable[[list[dict[str, Any]]], str]] = {
    "minilm": table,
    "heads": heads_table,
    "resnet": resnet_table,
    "lenet": lenet_table,
}


def merge(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Saved results with the sections in ``new`` replaced; a file of the older single-table
    layout (``rows`` + ``targets`` at the top) counts as the minilm section."""
    sections = dict(saved.get("sections", {}))
    if "rows" in saved and "minilm" not in sections:
        sections["minilm"] = {
            "title": MINILM_TITLE,
            "description": minilm_description(None),
            "rows": saved["rows"],
            "targets": saved.get("targets", []),
        }
    return merge_sections({"sections": sections}, new, SECTIONS)


def render(results: dict[str, Any]) -> str:
    """The markdown of every section in ``results``: title, description, table, targets."""
    return render_sections(TITLE, results, TABLES)


# -- minilm section ---------------------------------------------------------------------------
MINILM_TITLE = f"Unstructured and 2:4 pruning of all-MiniLM-L6-v2 ({TASK})"


def minilm_description(torch_version: str | None) -> str:
    torch_text = f"torch {torch_version}" if torch_version else "torch version not recorded"
    return (
        f"Every Linear layer of the encoder, one shot, {torch_text}, {THREADS} threads; "
        "sparse layers stored as values + bitmask."
    )


def measure(task: Any, name: str, options: dict[str, Any] | None, work: Path) -> dict[str, Any]:
    import slimkit

    out: dict[str, Any] = {"row": name}
    print(f"-- {name}", flush=True)
    try:
        model = task.model()
        start = time.perf_counter()
        if options is not None:
            slimkit.compress(model, {"name": name, "stages": [{"prune": options}]}, task=task)
            out["seconds"] = time.perf_counter() - start
        path = slimkit.save(model, work / name.replace(":", "-"), overwrite=True)
        out["size_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        loaded = slimkit.load(path)
        shutil.rmtree(path)
        out.update(task.evaluate(loaded))
    except Exception as e:  # a failing row is reported, never the end of the run
        out["error"] = error_line(e)
    print("   " + table([out]).splitlines()[2], flush=True)
    return out


def minilm_section(work: Path, only: list[str] | None) -> dict[str, Any]:
    import torch

    from slimkit.tasks import get

    task = get(TASK)
    rows = [measure(task, "fp32", None, work)]
    for name, options in ROWS.items():
        if not only or name in only:
            rows.append(measure(task, name, options, work))
    return {
        "title": MINILM_TITLE,
        "description": minilm_description(torch.__version__),
        "rows": rows,
        "targets": targets(rows),
    }


# -- heads section -----------------------------------------------------------------------------
def heads_section(work: Path, only: list[str] | None) -> dict[str, Any]:
    import torch

    import slimkit
    from slimkit.compressed import count_params
    from slimkit.evaluate.macs import count_macs
    from slimkit.tasks import get

    task = get(TASK)
    built = []
    for name in ("fp32", HEADS):
        row: dict[str, Any] = {"row": name, "note": "saved + loaded"}
        print(f"-- {TASK} {name}", flush=True)
        try:
            model = task.model()
            if name != "fp32":
                start = time.perf_counter()
                slimkit.compress(model, HEADS, task=task)
                row["seconds"] = time.perf_counter() - start
            path = slimkit.save(model, work / name, overwrite=True)
            row["size_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            loaded = slimkit.load(path)
            shutil.rmtree(path)
            row.update(task.evaluate(loaded))
            row["params"] = count_params(loaded)
            row["macs"] = count_macs(loaded, task.example_inputs())
            built.append((row, loaded))
        except Exception as e:  # a failing row is reported, never the end of the run
            row["error"] = error_line(e)
            built.append((row, None))
    timed = [(row, m) for row, m in built if m is not None]
    inputs = task.latency_inputs()
    load = time_rows(timed, inputs, HEADS_RUNS, 2, THREADS)
    rows = [row for row, _ in built]
    add_comparisons(rows, _row(rows, "fp32"))
    description = (
        f"torch {torch.__version__}. The shipped {HEADS} recipe (2 of 12 attention heads per "
        "layer and 30% of each FFN's intermediate neurons removed, scored by mean |activation| "
        "on the calibration texts times the output projection's column norm, bias "
        "compensation), one shot, no fine-tuning. Latency: median of "
        f"{HEADS_RUNS} warm runs, {task.latency_description()}, {THREADS} threads, both models "
        f"timed alternately in one process; the 1-minute load average reached {load:.1f} on "
        f"{os.cpu_count()} CPUs while timing. Bytes on disk: the whole artifact. "
        "Cosine: mean-pooled embeddings against fp32's."
    )
    return {
        "title": f"Attention-head and FFN-neuron pruning of all-MiniLM-L6-v2 ({HEADS})",
        "description": description,
        "rows": rows,
        "targets": heads_targets(rows),
    }


# -- resnet section ----------------------------------------------------------------------------
def finetune_only(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe (as a dict) with its finetune stages only, under a name of its own."""
    stages = [s for s in recipe["stages"] if "finetune" in s]
    if not stages:
        raise ValueError(f"recipe {recipe['name']!r} has no finetune stage")
    return {"name": f"{recipe['name']}-finetune", "stages": stages}


def _slimkit_structured(task: Any, work: Path) -> Any:
    import slimkit

    model = task.model()
    slimkit.compress(model, STRUCTURED, task=task)
    return round_trip(model, work / STRUCTURED)


def _torch_pruning(task: Any, work: Path) -> Any:
    """Torch-Pruning at structured-50's ratio (L1 magnitude importance, the final Linear
    ignored), then structured-50's finetune stage run by slimkit on the pruned model."""
    import torch_pruning as tp

    import slimkit

    shipped = shipped_recipe(STRUCTURED)
    (prune,) = (s["prune"] for s in shipped["stages"] if "prune" in s)
    model = task.model()
    pruner = tp.pruner.MetaPruner(
        model,
        task.example_inputs(),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=prune["ratio"],
        ignored_layers=[model.fc],
    )
    pruner.step()
    slimkit.compress(model, finetune_only(shipped), task=task)
    return model.eval()


def _peer_version() -> str:
    try:
        import torch_pruning as tp
    except ImportError:
        return "(not installed)"
    return str(getattr(tp, "__version__", "(version unknown)"))


#: resnet row -> (builder of its model, note)
RESNET_ROWS: dict[str, tuple[Callable[[Any, Path], Any], str]] = {
    "fp32": (lambda task, work: round_trip(task.model(), work / "fp32"), "saved + loaded"),
    STRUCTURED: (_slimkit_structured, "slimkit recipe; saved + loaded"),
    PEER: (_torch_pruning, "torch-pruning L1, ratio 0.5, fc ignored + same finetune; as is"),
}


def _build(task: Any, name: str, work: Path) -> tuple[dict[str, Any], Any]:
    """(row, model or None): the row holds the time of building and any error."""
    import torch

    build, note = RESNET_ROWS[name]
    out: dict[str, Any] = {"row": name, "note": note}
    print(f"-- {RESNET} {name}", flush=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model = build(task, work)
    except Exception as e:  # a failing row is reported, never the end of the run
        out["error"] = error_line(e)
        return out, None
    out["seconds"] = time.perf_counter() - start
    return out, model


def resnet_section(work: Path, only: list[str] | None) -> dict[str, Any]:
    import torch

    from slimkit.compressed import count_params
    from slimkit.evaluate.macs import count_macs
    from slimkit.tasks import get

    task = get(RESNET)
    built = [_build(task, n, work) for n in RESNET_ROWS if n == "fp32" or not only or n in only]
    timed = []
    for row, model in built:
        if model is None:
            continue
        try:
            row.update(task.evaluate(model))
            row["params"] = count_params(model)
            row["macs"] = count_macs(model, task.example_inputs())
        except Exception as e:  # a failing row is reported, never the end of the run
            row["error"] = error_line(e)
            continue
        timed.append((row, model))
    inputs = task.latency_inputs(LATENCY_BATCH)
    load = time_rows(timed, inputs, RUNS, WARMUP, THREADS)
    rows = [row for row, _ in built]
    add_comparisons(rows, _row(rows, "fp32"))
    description = (
        f"torch {torch.__version__}. {STRUCTURED}: the shipped recipe (structured pruning of "
        "half the channels of every coupled group by L1 norm, then its finetune stage). "
        f"{PEER}: Torch-Pruning {_peer_version()}'s MetaPruner with MagnitudeImportance(p=1) "
        "at the same ratio, "
        f"the final Linear ignored, then {STRUCTURED}'s finetune stage (same epochs, lr, seed) "
        "run by slimkit; measured as the pruner leaves it (not saved). MACs per example "
        "(slimkit's counter); latency: median of "
        f"{RUNS} warm runs at batch {LATENCY_BATCH}, {THREADS} threads, every model timed "
        "alternately in one process; the machine's 1-minute load average reached "
        f"{load:.1f} on {os.cpu_count()} CPUs while timing. Drop: fp32 accuracy minus the "
        "row's (450 test images)."
    )
    return {
        "title": f"Structured pruning of {RESNET}: slimkit vs Torch-Pruning",
        "description": description,
        "rows": rows,
        "targets": resnet_targets(rows),
    }


# -- lenet section ------------------------------------------------------------------------------
def _measure_bytes(task: Any, name: str, recipe: str | None, work: Path) -> dict[str, Any]:
    """Compress (unless ``recipe`` is None), save, load, evaluate; an error becomes the row's."""
    import torch

    import slimkit

    out: dict[str, Any] = {"task": task.name, "row": name}
    print(f"-- {task.name} {name}", flush=True)
    try:
        torch.manual_seed(0)
        model = task.model()
        start = time.perf_counter()
        if recipe is not None:
            slimkit.compress(model, recipe, task=task)
            out["seconds"] = time.perf_counter() - start
        path = slimkit.save(model, work / task.name / name, overwrite=True)
        out["model_bytes"] = (path / "model.safetensors").stat().st_size
        loaded = slimkit.load(path)
        shutil.rmtree(path)
        out.update(task.evaluate(loaded))
    except Exception as e:  # a failing row is reported, never the end of the run
        out["error"] = error_line(e)
    return out


def lenet_section(work: Path, only: list[str] | None) -> dict[str, Any]:
    import torch

    from slimkit.tasks import get

    rows: list[dict[str, Any]] = []
    for task_name in ("digits-lenet", "digits-mlp"):
        task = get(task_name)
        base = _measure_bytes(task, "fp32", None, work)
        pruned = _measure_bytes(task, UNSTRUCTURED, UNSTRUCTURED, work)
        add_comparisons([base, pruned], base)
        rows += [base, pruned]
    description = (
        f"torch {torch.__version__}. The shipped {UNSTRUCTURED} recipe (gradual magnitude "
        "pruning to 90% with fine-tuning); sparse layers stored as nonzero values + bitmask. "
        "Drop: fp32 accuracy minus the row's (450 test images); 'vs fp32' compares "
        "model.safetensors. digits-mlp is reported for information (no target)."
    )
    return {
        "title": f"Unstructured 90% pruning of the digits models ({UNSTRUCTURED})",
        "description": description,
        "rows": rows,
        "targets": lenet_targets(rows),
    }


RUNNERS: dict[str, Callable[[Path, list[str] | None], dict[str, Any]]] = {
    "minilm": minilm_section,
    "heads": heads_section,
    "resnet": resnet_section,
    "lenet": lenet_section,
}


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--only", nargs="+", metavar="ROW", choices=[*ROWS, STRUCTURED, PEER])
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    new = {}
    with tempfile.TemporaryDirectory(prefix="prune-") as tmp:
        for name in args.section:
            section = RUNNERS[name](Path(tmp), args.only)
            new[name] = section
            print(
                "\n" + TABLES[name](section["rows"]) + "\n" + format_targets(section["targets"]),
                flush=True,
            )
    path = RESULTS / "prune.json"
    saved = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    results = merge(saved, new)
    write_text(path, json.dumps(results, indent=2) + "\n")
    write_text(RESULTS / "prune.md", render(results))


if __name__ == "__main__":
    run()
