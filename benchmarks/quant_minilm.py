"""Quantization on all-MiniLM-L6-v2: slimkit's recipes against peer toolkits, in one process.

Task ``minilm-topics``; every row is measured here: speedup against torch fp32 eager (median
of warm runs, each candidate timed alternately with the fp32 model), cosine of the mean-pooled
embeddings to fp32 (mean, min), topic 1-NN accuracy, size on disk, quantization time (the
quantization call only) and whether the compression is only simulated. slimkit rows are
compressed, saved and loaded back before measuring; peer rows (``peers.py``) are sized by what
the peer itself saves. A recipe or peer that fails becomes a row with the error in its note.
A candidate whose call on the latency batch would be more than ``--max-slowdown`` times slower
than fp32 (estimated from calls on a few examples) is neither evaluated nor timed; slow
candidates get fewer timed runs (at least 3) to keep each row within ``--budget-seconds``.
Prints the table and the targets; writes ``benchmarks/results/quant_minilm.{json,md}``.

    python benchmarks/quant_minilm.py [--runs 10] [--only NAME ...] [--skip-peers]
        [--budget-seconds 150] [--max-slowdown 10] [--merge] [--rerender]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from _common import cpu_info, format_targets, markdown_table, shipped_recipe, target

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "minilm-topics"
THREADS = 2
WARMUP = 2
MIN_RUNS = 3
BUDGET_SECONDS = 150.0  # per row, for the timed rounds (fewer runs for slow candidates)
MAX_SLOWDOWN = 10.0  # a candidate this much slower than fp32 is neither evaluated nor timed
PROBE_SIZES = (4, 12)  # examples in the calls that estimate a candidate's latency
SLIMKIT_RECIPES = [
    "w8-rtn",
    "w8a8",
    "w8a8-static",
    "w4-rtn",
    "w4-gptq",
    "w4-nf4",
    "w4-awq",
    "w3-gptq",
    "mixed-4.5bit",
    "kmeans-4bit-noft",
]
W5 = "w5-gptq"  # built from w4-gptq with bits 5: the size bound of mixed-4.5bit
# rows built from a shipped recipe with other quantize options: name -> (recipe, options)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # the integer results of the int_mm kernel (VNNI/AMX CPUs), computed on the fp32 kernel
    "w8a8-exact": ("w8a8", {"kernel": "reference"}),
    "w8a8-nosq": ("w8a8", {"smoothquant": False}),
    W5: ("w4-gptq", {"bits": 5}),
    # minilm-topics has no labels to fine-tune shared values on
    "kmeans-4bit-noft": ("kmeans-4bit", {"finetune_epochs": 0}),
}
VERSIONS = ("transformers", "torchao", "hqq", "optimum-quanto", "onnx", "onnxruntime")

# targets
W8A8_COS, W8A8_KNN_DROP, W8A8_SPEEDUP = 0.997, 0.5, 2.5
W4_COS, W4_SIZE_RATIO, W4_SECONDS = 0.985, 0.2, 120.0
W3_COS = 0.95


# -- rows and tables (pure) --------------------------------------------------------------
def row(
    name: str,
    method: str,
    *,
    metrics: dict[str, float] | None = None,
    latency_ms: float | None = None,
    fp32_latency_ms: float | None = None,
    size_bytes: int | None = None,
    fp32_size_bytes: int | None = None,
    quant_seconds: float | None = None,
    simulated: bool | None = None,
    runs: int | None = None,
    probe: dict[str, float] | None = None,
    note: str = "",
    error: str | None = None,
) -> dict[str, Any]:
    """One table row; speedup and size ratio are derived where both figures are known."""
    m = metrics or {}
    speedup = None
    if latency_ms and fp32_latency_ms is not None:
        speedup = fp32_latency_ms / latency_ms
    ratio = None
    if size_bytes is not None and fp32_size_bytes:
        ratio = size_bytes / fp32_size_bytes
    return {
        "name": name,
        "method": method,
        "speedup": speedup,
        "latency_ms": latency_ms,
        "fp32_latency_ms": fp32_latency_ms,
        "cosine_mean": m.get("cosine_mean"),
        "cosine_min": m.get("cosine_min"),
        "knn_accuracy": m.get("knn_accuracy"),
        "size_bytes": size_bytes,
        "size_ratio": ratio,
        "quant_seconds": quant_seconds,
        "simulated": simulated,
        "runs": runs,
        "probe": probe,
        "note": note,
        "error": error,
    }


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _flag(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def _note(r: dict[str, Any]) -> str:
    parts = [r["note"]] if r["note"] else []
    if r["error"]:
        parts.append(f"error: {r['error']}")
    return "; ".join(parts).replace("|", "/").replace("\n", " ")


COLUMNS = (
    "name",
    "method",
    "speedup",
    "runs",
    "cos mean",
    "cos min",
    "1-NN",
    "size bytes",
    "size vs fp32",
    "quant s",
    "simulated",
    "note",
)


def table_row(r: dict[str, Any]) -> list[str]:
    return [
        r["name"],
        r["method"],
        _fmt(r["speedup"], ".2f", "x"),
        _fmt(r["runs"], "d"),
        _fmt(r["cosine_mean"], ".5f"),
        _fmt(r["cosine_min"], ".5f"),
        _fmt(r["knn_accuracy"], ".4f"),
        _fmt(r["size_bytes"], ","),
        _fmt(r["size_ratio"], ".3f", "x"),
        _fmt(r["quant_seconds"], ".1f"),
        _flag(r["simulated"]),
        _note(r),
    ]


def describe_setup(setup: dict[str, Any]) -> str:
    flags = ", ".join(f for f, present in setup["cpu_flags"].items() if present) or "none"
    return (
        f"Task {setup['task']} (all-MiniLM-L6-v2), batch {setup['batch']} x {setup['seq_len']} "
        f"tokens, {setup['threads']} threads, torch {setup['torch']}. Speedup: torch fp32 eager "
        f"median / candidate median over up to {setup['runs']} warm runs (column runs; fewer "
        f"where a row's timed rounds would pass {setup['budget_seconds']:.0f} s) after "
        f"{setup['warmup']} warm-up rounds, each candidate timed alternately with the fp32 model "
        f"in the same process. CPU: {setup['cpu_model']}; int8-relevant flags: {flags}. "
        f"{_gemm_text(setup.get('gemm'))}"
        + (f" Table merged from {setup['merged']}." if setup.get("merged") else "")
    ).rstrip()


def _gemm_text(gemm: dict[str, Any] | None) -> str:
    if not gemm:
        return ""
    return (
        f"Kernels here: torch._int_mm int8 GEMM {gemm['shape']} {gemm['int_mm_ms']:.0f} ms, "
        f"fp32 matmul {gemm['fp32_mm_ms']:.0f} ms."
    )


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    table = markdown_table("| " + " | ".join(COLUMNS) + " |", [table_row(r) for r in rows])
    title = "# Quantization of all-MiniLM-L6-v2: slimkit and peers"
    return f"{title}\n\n{describe_setup(setup)}\n\n{table}"


# -- targets (pure) ----------------------------------------------------------------------
def _measured(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The row called ``name`` when it has its metrics, else None."""
    for r in rows:
        if r["name"] == name and r["cosine_mean"] is not None:
            return r
    return None


def _ran(rows: list[dict[str, Any]], *names: str) -> bool:
    return any(r["name"] in names for r in rows)


def _check(
    rows: list[dict[str, Any]],
    names: tuple[str, ...],
    text: str,
    figure: Callable[[dict[str, Any]], str],
    passes: Callable[[dict[str, Any]], bool],
) -> dict[str, Any]:
    """Met when any of ``names`` passes; not measured (None) when none of them ran."""
    found = [r for n in names if (r := _measured(rows, n)) is not None]
    if not found:
        status = False if _ran(rows, *names) else None
        return target(text, "no result", status)
    figures = "; ".join(f"{r['name']}: {figure(r)}" for r in found)
    return target(text, figures, any(passes(r) for r in found))


def _ge(value: float | None, bound: float) -> bool:
    return value is not None and value >= bound


def _knn_drop(r: dict[str, Any], fp32: dict[str, Any] | None) -> float | None:
    if fp32 is None or r["knn_accuracy"] is None or fp32["knn_accuracy"] is None:
        return None
    return 100.0 * (fp32["knn_accuracy"] - r["knn_accuracy"])


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of this benchmark: text, measured figure, met (True/False, None: not run)."""
    fp32 = _measured(rows, "fp32")
    w4_names = ("w4-rtn", "w4-gptq", "w4-awq")
    best_w4 = max(
        (r for n in w4_names if (r := _measured(rows, n)) is not None),
        key=lambda r: r["cosine_mean"],
        default=None,
    )
    w5 = _measured(rows, W5)
    out = [
        _check(
            rows,
            ("w8a8",),
            f"w8a8 cosine mean >= {W8A8_COS}",
            lambda r: f"{r['cosine_mean']:.5f}",
            lambda r: _ge(r["cosine_mean"], W8A8_COS),
        ),
        _check(
            rows,
            ("w8a8",),
            f"w8a8 1-NN within {W8A8_KNN_DROP} points of fp32",
            lambda r: (
                f"1-NN {_fmt(r['knn_accuracy'], '.4f')} vs fp32 "
                f"{_fmt(None if fp32 is None else fp32['knn_accuracy'], '.4f')}, "
                f"drop {_fmt(_knn_drop(r, fp32), '+.2f')} points"
            ),
            lambda r: (d := _knn_drop(r, fp32)) is not None and d <= W8A8_KNN_DROP,
        ),
        _check(
            rows,
            ("w8a8",),
            "w8a8 not simulated",
            lambda r: f"simulated {_flag(r['simulated'])}",
            lambda r: r["simulated"] is False,
        ),
        _check(
            rows,
            ("w8a8",),
            f"w8a8 speedup >= {W8A8_SPEEDUP}x",
            lambda r: _fmt(r["speedup"], ".2f", "x"),
            lambda r: _ge(r["speedup"], W8A8_SPEEDUP),
        ),
        _check(
            rows,
            ("w4-gptq", "w4-awq"),
            f"4-bit g64 GPTQ or AWQ: cosine mean >= {W4_COS}, size <= {W4_SIZE_RATIO}x fp32, "
            f"quantization < {W4_SECONDS:.0f} s",
            lambda r: (
                f"cos {r['cosine_mean']:.5f}, size {_fmt(r['size_ratio'], '.3f', 'x')}, "
                f"{_fmt(r['quant_seconds'], '.1f', ' s')}"
            ),
            lambda r: (
                _ge(r["cosine_mean"], W4_COS)
                and r["size_ratio"] is not None
                and r["size_ratio"] <= W4_SIZE_RATIO
                and r["quant_seconds"] is not None
                and r["quant_seconds"] < W4_SECONDS
            ),
        ),
        _check(
            rows,
            ("w3-gptq",),
            f"w3-gptq cosine mean >= {W3_COS}",
            lambda r: f"{r['cosine_mean']:.5f}",
            lambda r: _ge(r["cosine_mean"], W3_COS),
        ),
    ]
    best = "no uniform 4-bit row" if best_w4 is None else f"{best_w4['name']} {_cos(best_w4)}"
    out.append(
        _check(
            rows,
            ("mixed-4.5bit",),
            "mixed-4.5bit cosine mean > best uniform 4-bit (rtn/gptq/awq)",
            lambda r: f"{_cos(r)} vs {best}",
            lambda r: best_w4 is not None and r["cosine_mean"] > best_w4["cosine_mean"],
        )
    )
    w5_figure = "no w5-gptq row" if w5 is None else f"{W5} {_fmt(w5['size_bytes'], ',')} B"
    out.append(
        _check(
            rows,
            ("mixed-4.5bit",),
            f"mixed-4.5bit size <= uniform 5-bit g64 ({W5})",
            lambda r: f"{_fmt(r['size_bytes'], ',')} B vs {w5_figure}",
            lambda r: (
                w5 is not None
                and r["size_bytes"] is not None
                and w5["size_bytes"] is not None
                and r["size_bytes"] <= w5["size_bytes"]
            ),
        )
    )
    return out


def _cos(r: dict[str, Any]) -> str:
    return f"cos {r['cosine_mean']:.5f}"


# -- recipes, machine ---------------------------------------------------------------------
def with_options(recipe: dict[str, Any], changes: dict[str, Any], name: str) -> dict[str, Any]:
    """A recipe dict like ``recipe`` named ``name``, its quantize stages updated by ``changes``."""
    stages = []
    for stage in recipe["stages"]:
        ((kind, options),) = stage.items()
        if kind == "quantize":
            options = {**options, **changes}
        stages.append({kind: options})
    return {"name": name, "stages": stages}


def one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:300]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def versions() -> dict[str, str]:
    out = {}
    for package in VERSIONS:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


# -- measuring ---------------------------------------------------------------------------
def plan_runs(round_seconds: float, budget_seconds: float, max_runs: int) -> int:
    """Timed runs that fit ``budget_seconds`` (warm-up included) at ``round_seconds`` a round:
    at least MIN_RUNS, at most ``max_runs``."""
    fit = int(budget_seconds / round_seconds) - WARMUP if round_seconds > 0 else max_runs
    return max(min(MIN_RUNS, max_runs), min(max_runs, fit))


def extrapolate(sizes: tuple[int, int], ms: tuple[float, float], batch: int) -> float:
    """Milliseconds of a call on ``batch`` examples from calls on two smaller sizes: a fixed
    cost plus a cost per example (never below the larger call's time)."""
    (n1, n2), (t1, t2) = sizes, ms
    per_example = max(0.0, (t2 - t1) / (n2 - n1))
    return t2 + per_example * (batch - n2)


def too_slow_note(probe: dict[str, Any], fp32_ms: float, batch: int, limit: float) -> str:
    """Why a candidate was neither evaluated nor timed: its estimated call vs fp32's."""
    (n1, n2), (t1, t2) = probe["examples"], probe["ms"]
    return (
        f"not evaluated nor timed: calls on {n1} and {n2} examples took {t1 / 1000:.1f} s and "
        f"{t2 / 1000:.1f} s, about {probe['estimate_ms'] / 1000:.0f} s for a batch of {batch} "
        f"vs {fp32_ms / 1000:.1f} s fp32 (> --max-slowdown {limit:g}x)"
    )


@dataclasses.dataclass
class Bench:
    task: Any
    baseline: Any  # the fp32 eager model every candidate is timed against
    inputs: Any
    runs: int
    work: Path
    budget_seconds: float = BUDGET_SECONDS
    max_slowdown: float = MAX_SLOWDOWN
    fp32_size: int | None = None
    fp32_ms: float | None = None  # the baseline's latest median on the latency batch

    @property
    def batch(self) -> int:
        return int(self.inputs["input_ids"].shape[0])


Make = Callable[[dict[str, Any]], Any]  # fills quant_seconds / size_bytes / ...; returns model


def probe(bench: Bench, model: Any) -> dict[str, Any]:
    """Calls of ``model`` on the first PROBE_SIZES examples (after one warm-up call) and the
    estimated milliseconds of a call on the whole latency batch."""
    import torch

    ms = []
    with torch.inference_mode():
        for i, n in enumerate((PROBE_SIZES[0], *PROBE_SIZES)):
            small = {k: v[:n] for k, v in bench.inputs.items()}
            start = time.perf_counter()
            model(**small)
            if i:
                ms.append((time.perf_counter() - start) * 1000.0)
    estimate = extrapolate(PROBE_SIZES, (ms[0], ms[1]), bench.batch)
    return {"examples": list(PROBE_SIZES), "ms": ms, "estimate_ms": estimate}


def evaluate_and_time(bench: Bench, model: Any, fields: dict[str, Any]) -> None:
    """Metrics, then latency against fp32, unless a probe shows it would take too long."""
    from slimkit.evaluate.latency import time_alternating

    fields["probe"] = p = probe(bench, model)
    fp32_ms = bench.fp32_ms or p["estimate_ms"]  # the fp32 row: the model is fp32 itself
    if p["estimate_ms"] > bench.max_slowdown * fp32_ms:
        add_note(fields, too_slow_note(p, fp32_ms, bench.batch, bench.max_slowdown))
        return
    fields["metrics"] = bench.task.evaluate(model)
    runs = plan_runs((p["estimate_ms"] + fp32_ms) / 1000.0, bench.budget_seconds, bench.runs)
    base, cand = time_alternating(
        [bench.baseline, model], bench.inputs, runs=runs, warmup=WARMUP, threads=THREADS
    )
    fields["fp32_latency_ms"], fields["latency_ms"] = base["median"], cand["median"]
    fields["runs"] = runs
    bench.fp32_ms = base["median"]


def add_note(fields: dict[str, Any], text: str) -> None:
    fields["note"] = "; ".join(t for t in (fields.get("note", ""), text) if t)


def measure(bench: Bench, name: str, method: str, make: Make) -> dict[str, Any]:
    """Build a candidate with ``make``, evaluate it, time it against fp32; errors -> note."""
    fields: dict[str, Any] = {}
    model = None
    print(f"-- {name}", flush=True)
    try:
        model = make(fields)
        evaluate_and_time(bench, model, fields)
    except Exception as e:  # a failing recipe or peer is a row, never the end of the run
        fields["error"] = one_line(e)
    finally:
        del model
        gc.collect()
    out = row(name, method, fp32_size_bytes=bench.fp32_size, **fields)
    print("   " + " | ".join(table_row(out)[2:]), flush=True)
    return out


def fp32_make(bench: Bench) -> Make:
    def make(fields: dict[str, Any]) -> Any:
        import slimkit

        path = slimkit.save(bench.task.model(), bench.work / "fp32", overwrite=True)
        fields["size_bytes"] = bench.fp32_size = dir_bytes(path)
        model = slimkit.load(path)
        shutil.rmtree(path)
        fields["simulated"] = False
        fields["note"] = "slimkit.save / load of the unmodified model"
        return model

    return make


def load_recipe(name: str) -> Any:
    from slimkit.recipe import Recipe, resolve

    if name in VARIANTS:
        base_name, changes = VARIANTS[name]
        base = shipped_recipe(base_name)
        return Recipe.from_dict(with_options(base, changes, name), where=name)
    return Recipe.from_file(resolve(name))


def layer_note(model: Any) -> str:
    from slimkit.compressed import CompressedModule

    kinds = sorted({m.describe() for m in model.modules() if isinstance(m, CompressedModule)})
    return "; ".join(kinds)


def slimkit_make(bench: Bench, name: str) -> Make:
    def make(fields: dict[str, Any]) -> Any:
        import slimkit
        from slimkit.compressed import is_simulated

        recipe = load_recipe(name)
        model = bench.task.model()
        start = time.perf_counter()
        slimkit.compress(model, recipe, task=bench.task)
        fields["quant_seconds"] = time.perf_counter() - start
        path = slimkit.save(model, bench.work / name, overwrite=True)
        del model
        fields["size_bytes"] = dir_bytes(path)
        loaded = slimkit.load(path)
        shutil.rmtree(path)
        fields["simulated"] = is_simulated(loaded)
        fields["note"] = layer_note(loaded)
        return loaded

    return make


def load_peers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slimkit_bench_peers", HERE / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def peer_make(bench: Bench, peers: ModuleType, name: str) -> Make:
    def make(fields: dict[str, Any]) -> Any:
        _, quantize = peers.PEERS[name]
        fields["note"] = peers.describe(name)["note"]
        model = bench.task.model()
        calib = bench.task.calibration_data()
        start = time.perf_counter()
        model = quantize(model, calib)
        fields["quant_seconds"] = time.perf_counter() - start
        fields["size_bytes"] = peers.size_on_disk(model)
        fields["simulated"] = False
        return model

    return make


def slimkit_names() -> list[str]:
    """The recipes to run: SLIMKIT_RECIPES, each variant after its shipped recipe."""
    from slimkit.recipe import shipped

    names = list(SLIMKIT_RECIPES)
    for name, (base, _) in reversed(VARIANTS.items()):
        if base in shipped() and base in names and name not in names:
            names.insert(names.index(base) + 1, name)
    return names


def gemm_probe(m: int = 4096, k: int = 384, n: int = 1536) -> dict[str, Any]:
    """Milliseconds of one warm int8 ``torch._int_mm`` and fp32 matmul of the same shape."""
    import torch

    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    af, bf = a.float(), b.float()
    out = {"shape": f"{m}x{k} @ {k}x{n}"}
    for key, fn in (("fp32_mm_ms", lambda: af @ bf), ("int_mm_ms", lambda: torch._int_mm(a, b))):
        fn()
        start = time.perf_counter()
        fn()
        out[key] = (time.perf_counter() - start) * 1000.0
    return out


def setup_info(bench: Bench, names: list[str]) -> dict[str, Any]:
    import torch

    from slimkit.evaluate.latency import leading_dim

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model, flags = cpu_info(cpuinfo)
    return {
        "task": TASK,
        "batch": leading_dim(bench.inputs),
        "seq_len": int(bench.inputs["input_ids"].shape[1]),
        "threads": THREADS,
        "runs": bench.runs,
        "warmup": WARMUP,
        "budget_seconds": bench.budget_seconds,
        "max_slowdown": bench.max_slowdown,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": model,
        "cpu_flags": flags,
        "versions": versions(),
        "rows_run": names,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model (default 10)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these rows")
    parser.add_argument("--skip-peers", action="store_true", help="slimkit rows only")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the saved rows of earlier runs, replacing those measured again (with --only)",
    )
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="measure nothing: rewrite the table and targets from the saved JSON results",
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=BUDGET_SECONDS,
        help="per row, for the timed rounds: fewer runs (at least 3) for slow candidates",
    )
    parser.add_argument(
        "--max-slowdown",
        type=float,
        default=MAX_SLOWDOWN,
        help="skip evaluating and timing a candidate estimated this many times slower than fp32",
    )
    return parser.parse_args(argv)


def selected(all_names: list[str], only: list[str] | None) -> list[str]:
    if not only:
        return all_names
    unknown = [n for n in only if n not in all_names]
    if unknown:
        sys.exit(f"unknown row name(s): {', '.join(unknown)}; available: {', '.join(all_names)}")
    return [n for n in all_names if n in only]


def merge_rows(
    saved: list[dict[str, Any]], new: list[dict[str, Any]], order: list[str]
) -> list[dict[str, Any]]:
    """``saved`` rows with those of ``new`` replacing the same names (``new``'s fp32 row
    only when no saved one exists), sorted by ``order`` (unknown names last)."""
    by_name = {r["name"]: r for r in saved}
    for r in new:
        if r["name"] != "fp32" or "fp32" not in by_name:
            by_name[r["name"]] = r
    rank = {name: i for i, name in enumerate(order)}
    return sorted(by_name.values(), key=lambda r: rank.get(r["name"], len(order)))


def write_results(rows: list[dict[str, Any]], setup: dict[str, Any]) -> None:
    checks = targets(rows)
    text = markdown(rows, setup) + "\n" + format_targets(checks)
    result = {"setup": setup, "rows": rows, "targets": checks}
    write_text(RESULTS / "quant_minilm.json", json.dumps(result, indent=2) + "\n")
    write_text(RESULTS / "quant_minilm.md", text)
    print("\n" + text)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rerender:
        saved = json.loads((RESULTS / "quant_minilm.json").read_text())
        write_results(saved["rows"], saved["setup"])
        return
    import torch

    from slimkit.tasks import get

    torch.set_num_threads(THREADS)
    peers = None if args.skip_peers else load_peers()
    recipes = slimkit_names()
    peer_names = [] if peers is None else list(peers.PEERS)
    names = selected(recipes + peer_names, args.only)
    task = get(TASK)
    with tempfile.TemporaryDirectory(prefix="quant-minilm-") as tmp:
        bench = Bench(
            task,
            task.model(),
            task.latency_inputs(),
            args.runs,
            Path(tmp),
            budget_seconds=args.budget_seconds,
            max_slowdown=args.max_slowdown,
        )
        rows = [measure(bench, "fp32", "torch fp32 eager", fp32_make(bench))]
        for name in names:
            if name in recipes:
                rows.append(measure(bench, name, f"slimkit {name}", slimkit_make(bench, name)))
            else:
                assert peers is not None
                method = peers.PEERS[name][0]
                rows.append(measure(bench, name, method, peer_make(bench, peers, name)))
        setup = setup_info(bench, ["fp32", *names])
        setup["gemm"] = gemm_probe()
    if args.merge and (RESULTS / "quant_minilm.json").exists():
        saved = json.loads((RESULTS / "quant_minilm.json").read_text())
        rows = merge_rows(saved["rows"], rows, ["fp32", *recipes, *peer_names])
        setup["rows_run"] = [r["name"] for r in rows]
        setup["merged"] = "rows measured in separate runs, each against fp32 in its own run"
    write_results(rows, setup)


if __name__ == "__main__":
    run()
