"""Pruning on all-MiniLM-L6-v2: magnitude vs Wanda vs SparseGPT, 50% unstructured and 2:4.

Every row prunes the Linear layers of ``minilm-topics``'s model one shot, saves it, loads it
back and evaluates it: cosine of the mean-pooled embeddings to fp32 (mean, min), topic 1-NN
accuracy, bytes on disk and the time of the pruning call. Prints the table and the targets
(SparseGPT beats magnitude at 50% and at 2:4); writes ``benchmarks/results/prune.{json,md}``.

    python benchmarks/prune.py [--only ROW ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from slimkit.io.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "minilm-topics"

#: row name -> the prune stage's options
ROWS: dict[str, dict[str, Any]] = {
    "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    "wanda-50": {"method": "unstructured", "criterion": "wanda", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "magnitude-2:4": {"method": "nm", "n": 2, "m": 4, "criterion": "magnitude"},
    "wanda-2:4": {"method": "nm", "n": 2, "m": 4, "criterion": "wanda"},
    "sparsegpt-2:4": {"method": "sparsegpt", "n": 2, "m": 4},
}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| row | cos mean | cos min | 1-NN | size bytes | prune s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {_fmt(r.get('cosine_mean'), '.5f')} | "
            f"{_fmt(r.get('cosine_min'), '.5f')} | {_fmt(r.get('knn_accuracy'), '.4f')} | "
            f"{_fmt(r.get('size_bytes'), ',')} | {_fmt(r.get('seconds'), '.1f')} | "
            f"{r.get('error', '')} |"
        )
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SparseGPT's cosine mean above magnitude's, at 50% and at 2:4 (None: rows missing)."""
    cos = {r["row"]: r.get("cosine_mean") for r in rows}
    out = []
    for setting in ("50", "2:4"):
        s, m = cos.get(f"sparsegpt-{setting}"), cos.get(f"magnitude-{setting}")
        met = None if s is None or m is None else s > m
        figure = f"sparsegpt {_fmt(s, '.5f')} vs magnitude {_fmt(m, '.5f')}"
        out.append(
            {"target": f"SparseGPT beats magnitude at {setting}", "figure": figure, "met": met}
        )
    return out


def format_targets(checks: list[dict[str, Any]]) -> str:
    status = {True: "met", False: "NOT met", None: "not measured"}
    lines = [f"- {c['target']}: {status[c['met']]} ({c['figure']})" for c in checks]
    return "Targets:\n" + "\n".join(lines) + "\n"


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
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print("   " + table([out]).splitlines()[2], flush=True)
    return out


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ROW", choices=list(ROWS))
    args = parser.parse_args(argv)
    import torch

    from slimkit.tasks import get

    torch.set_num_threads(2)
    task = get(TASK)
    with tempfile.TemporaryDirectory(prefix="prune-") as tmp:
        rows = [measure(task, "fp32", None, Path(tmp))]
        for name, options in ROWS.items():
            if not args.only or name in args.only:
                rows.append(measure(task, name, options, Path(tmp)))
    checks = targets(rows)
    text = (
        f"# Pruning all-MiniLM-L6-v2 ({TASK})\n\nEvery Linear layer of the encoder, one shot, "
        f"torch {torch.__version__}, 2 threads; sparse layers stored as values + bitmask.\n\n"
        + table(rows)
        + "\n"
        + format_targets(checks)
    )
    write_text(
        RESULTS / "prune.json", json.dumps({"rows": rows, "targets": checks}, indent=2) + "\n"
    )
    write_text(RESULTS / "prune.md", text)
    print("\n" + text)


if __name__ == "__main__":
    run()
