"""Deploy all-MiniLM-L6-v2 (minilm-topics): slimkit's recipes on torch and exported to
onnxruntime and OpenVINO, beside the peers users deploy with, in one run.

Every row is the model itself on its runtime: its cosine, minimum cosine and 1-NN accuracy
come from its own embeddings (the task's 1,087 evaluation paragraphs against fp32 torch's),
its latency is the median of warm calls at batch 64 x 128 tokens, 2 threads, timed
alternately with torch fp32 eager in this process (the speedup is against that), its size is
the bytes of what it runs from (the export's files, or the artifact). Rows:

- torch: fp32 (the baseline), weights cast to bf16 (the whole model), slimkit bf16 / w8a8 /
  w8a8-static / w4-gptq artifacts;
- onnxruntime: the fp32 export, its ``quantize_dynamic`` int8 per channel (the peer), and
  slimkit's exports of w8a8 (``MatMulInteger``), w8a8-static, w4-gptq (``MatMulNBits``), bf16;
- OpenVINO: the fp32 export in fp32 and bf16 inference precision (the peer), NNCF's
  post-training int8 of it on the same calibration paragraphs (when ``nncf`` is installed),
  slimkit's OpenVINO exports of w8a8, w8a8-static, bf16 and w4-gptq (bf16 precision where
  the CPU has it).

Prints the CPU model and flags, the table and the issue's targets; writes
``benchmarks/results/deploy_minilm.<cpu>.{json,md}``, ``<cpu>`` the kind of CPU it ran on
(``amx``, ``avx512-bf16``, ``vnni`` or ``avx2``), so that each kind keeps its own table.

    python benchmarks/deploy_minilm.py [--runs 10] [--only ROW ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import cpu_line, format_targets, markdown_table, target

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "minilm-topics"
THREADS = 2
WARMUP = 2
BATCH = 64
#: OpenVINO's bf16 precision where the CPU has bf16 instructions, else fp32
COS_FLOOR = 0.997


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Bench:
    def __init__(self, task: Any, runs: int, work: Path) -> None:
        self.task, self.runs, self.work = task, runs, work
        self.baseline = task.model()
        self.inputs = task.latency_inputs(BATCH)
        self.calibration = task.calibration_data()
        self.artifacts: dict[str, Any] = {}

    def artifact(self, recipe: str) -> tuple[Any, Path, float]:
        """slimkit's ``recipe`` applied to the task model, saved, loaded (cached per run)."""
        import slimkit

        if recipe not in self.artifacts:
            start = time.perf_counter()
            model = slimkit.compress(self.task.model(), recipe, task=self.task)
            seconds = time.perf_counter() - start
            path = self.work / recipe
            slimkit.save(model, path)
            self.artifacts[recipe] = (slimkit.load(path), path, seconds)
        return self.artifacts[recipe]

    def exported(self, recipe: str | None, fmt: str = "onnx") -> Path:
        """The export of ``recipe``'s artifact (of the fp32 model for None)."""
        import slimkit

        name = f"{recipe or 'fp32'}-{fmt}"
        path = self.work / name
        if not path.exists():
            model = self.baseline if recipe is None else self.artifact(recipe)[0]
            slimkit.export(model, path, fmt, self.task.example_inputs())
        return path


Build = Callable[[Bench, dict[str, Any]], Any]


def torch_fp32(b: Bench, row: dict[str, Any]) -> Any:
    row["size_bytes"] = _dir_bytes(b.exported(None))  # the fp32 weights, as the export holds them
    return b.baseline


def torch_bf16_cast(b: Bench, row: dict[str, Any]) -> Any:
    import torch

    return b.task.model().to(torch.bfloat16)


def slimkit_torch(recipe: str) -> Build:
    def build(b: Bench, row: dict[str, Any]) -> Any:
        model, path, seconds = b.artifact(recipe)
        row["size_bytes"], row["compress_s"] = _dir_bytes(path), seconds
        return model

    return build


def exported(recipe: str | None, runtime: str, precision: str | None = None) -> Build:
    def build(b: Bench, row: dict[str, Any]) -> Any:
        from slimkit.deploy.runtime import RuntimeModel

        path = b.exported(recipe, "openvino" if runtime == "openvino" else "onnx")
        row["size_bytes"] = _dir_bytes(path) - (path / "export.json").stat().st_size
        if recipe is not None:
            row["compress_s"] = b.artifact(recipe)[2]
        wanted = _ov_precision() if precision == "auto" else precision
        return RuntimeModel(path, runtime, threads=THREADS, precision=wanted)

    return build


def ort_quantize_dynamic(b: Bench, row: dict[str, Any]) -> Any:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slimkit.deploy.runtime import RuntimeModel

    out = b.work / "ort-int8"
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    quantize_dynamic(
        b.exported(None) / "model.onnx", out / "model.onnx", weight_type=QuantType.QInt8,
        per_channel=True,
    )  # fmt: skip
    row["compress_s"] = time.perf_counter() - start
    row["size_bytes"] = _dir_bytes(out)
    return RuntimeModel(out, "onnxruntime", threads=THREADS)


def nncf_int8(b: Bench, row: dict[str, Any]) -> Any:
    import nncf
    import openvino as ov

    from slimkit.deploy.runtime import RuntimeModel

    core = ov.Core()
    model = core.read_model(str(b.exported(None) / "model.onnx"))
    names = [next(iter(i.get_names())) for i in model.inputs]
    data = nncf.Dataset(b.calibration, lambda batch: {n: batch[n].numpy() for n in names})
    start = time.perf_counter()
    quantized = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER)
    row["compress_s"] = time.perf_counter() - start
    out = b.work / "nncf-int8"
    out.mkdir(exist_ok=True)
    ov.save_model(quantized, str(out / "model.xml"))
    row["size_bytes"] = _dir_bytes(out)
    return RuntimeModel(out, "openvino", threads=THREADS, precision=_ov_precision())


def _ov_precision() -> str:
    from slimkit.cpu import has_bf16

    return "bf16" if has_bf16() else "f32"


#: name -> (runtime, what it is, build)
ROWS: dict[str, tuple[str, str, Build]] = {
    "fp32": ("torch", "fp32 eager (baseline)", torch_fp32),
    "torch-bf16-cast": ("torch", "whole model cast to bf16", torch_bf16_cast),
    "bf16": ("torch", "slimkit bf16", slimkit_torch("bf16")),
    "w8a8": ("torch", "slimkit w8a8 (int8 GEMM)", slimkit_torch("w8a8")),
    "w8a8-static": ("torch", "slimkit w8a8-static", slimkit_torch("w8a8-static")),
    "w4-gptq": ("torch", "slimkit w4-gptq", slimkit_torch("w4-gptq")),
    "ort-fp32": ("onnxruntime", "fp32 export", exported(None, "onnxruntime")),
    "ort-int8-dynamic": ("onnxruntime", "quantize_dynamic int8 per-channel", ort_quantize_dynamic),
    "ort-w8a8": ("onnxruntime", "slimkit export (MatMulInteger)", exported("w8a8", "onnxruntime")),
    "ort-w8a8-static": ("onnxruntime", "slimkit export", exported("w8a8-static", "onnxruntime")),
    "ort-w4-gptq": ("onnxruntime", "slimkit (MatMulNBits)", exported("w4-gptq", "onnxruntime")),
    "ort-bf16": ("onnxruntime", "slimkit export", exported("bf16", "onnxruntime")),
    "ov-fp32": ("openvino", "fp32 export, f32 precision", exported(None, "openvino", "f32")),
    "ov-bf16": ("openvino", "fp32 export, bf16 precision", exported(None, "openvino", "bf16")),
    "ov-nncf-int8": ("openvino", "NNCF quantize (transformer preset)", nncf_int8),
    "ov-w8a8": ("openvino", "slimkit export", exported("w8a8", "openvino", "auto")),
    "ov-w8a8-static": ("openvino", "slimkit export", exported("w8a8-static", "openvino", "auto")),
    "ov-bf16-slimkit": ("openvino", "slimkit bf16 export", exported("bf16", "openvino", "auto")),
    "ov-w4-gptq": ("openvino", "slimkit export", exported("w4-gptq", "openvino", "auto")),
}  # fmt: skip
PEERS = ("torch-bf16-cast", "ort-int8-dynamic", "ov-bf16", "ov-nncf-int8")
#: the uncompressed model on each runtime: neither a peer nor a slimkit recipe
BASELINES = ("fp32", "ort-fp32", "ov-fp32")


def measure(b: Bench, name: str) -> dict[str, Any]:
    from slimkit.evaluate.latency import time_alternating

    runtime, what, build = ROWS[name]
    row: dict[str, Any] = {"name": name, "runtime": runtime, "what": what}
    print(f"-- {name}", flush=True)
    model = None
    try:
        model = build(b, row)
        row["metrics"] = b.task.evaluate(model)
        base, cand = time_alternating(
            [b.baseline, model], b.inputs, runs=b.runs, warmup=WARMUP, threads=THREADS
        )
        row["fp32_ms"], row["latency_ms"] = base["median"], cand["median"]
        row["speedup"] = base["median"] / cand["median"]
    except Exception as e:  # a failing row is a row, never the end of the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        del model
        gc.collect()
    print("   " + " | ".join(table_row(row)[2:]), flush=True)
    return row


def table_row(r: dict[str, Any]) -> list[str]:
    m = r.get("metrics", {})

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return [
        r["name"], r["runtime"], f(r.get("speedup"), ".2f") + ("x" if "speedup" in r else ""),
        f(m.get("cosine_mean"), ".5f"), f(m.get("cosine_min"), ".5f"),
        f(m.get("knn_accuracy"), ".4f"), f(r.get("size_bytes"), ","),
        f(r.get("latency_ms"), ".1f"), r.get("error", r["what"]),
    ]  # fmt: skip


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from slimkit.cpu import has_bf16

    ok = [r for r in rows if "speedup" in r and "metrics" in r]
    ours = [r for r in ok if r["name"] not in PEERS + BASELINES]
    peers = [r for r in ok if r["name"] in PEERS]
    fp32 = next((r for r in ok if r["name"] == "fp32"), None)

    def cos(r: dict[str, Any]) -> float:
        return float(r["metrics"]["cosine_mean"])

    dominated = [
        p["name"] for p in peers
        if not any(o["speedup"] >= p["speedup"] and cos(o) >= cos(p) for o in ours)
    ]  # fmt: skip
    checks = [
        target(
            "no peer both faster and more faithful than every slimkit point",
            "unmatched: " + (", ".join(dominated) or "none"),
            not dominated if peers and ours else None,
        )
    ]
    knn0 = None if fp32 is None else fp32["metrics"].get("knn_accuracy")
    faithful = [
        o for o in ours
        if cos(o) >= COS_FLOOR and knn0 is not None
        and (knn0 - o["metrics"].get("knn_accuracy", 0.0)) * 100 <= 0.5
    ]  # fmt: skip
    best = max(faithful, key=lambda r: r["speedup"], default=None)
    if has_bf16():
        ov = next((r for r in ok if r["name"] == "ov-bf16"), None)
        bound = None if ov is None else 1.2 * ov["speedup"]
        figure = "no faithful slimkit row" if best is None else (
            f"{best['name']} {best['speedup']:.2f}x vs OpenVINO bf16 {ov['speedup']:.2f}x"
            if ov else f"{best['name']} {best['speedup']:.2f}x; OpenVINO bf16 not measured"
        )  # fmt: skip
        met = None if bound is None or best is None else best["speedup"] >= bound
        checks.append(target(
            f"bf16 CPU: a slimkit row at cos >= {COS_FLOOR}, 1-NN within 0.5 points, "
            ">= 1.2x OpenVINO bf16", figure, met,
        ))  # fmt: skip
    else:
        figure = (
            "no faithful slimkit row" if best is None else f"{best['name']} {best['speedup']:.2f}x"
        )
        checks.append(target(
            f"no bf16 CPU: a slimkit row at cos >= {COS_FLOOR} and 1-NN within 0.5 points "
            ">= 1.8x torch fp32", figure, None if best is None else best["speedup"] >= 1.8,
        ))  # fmt: skip
    w4 = next((r for r in ok if r["name"] == "ort-w4-gptq"), None)
    f32 = next((r for r in ok if r["name"] == "ort-fp32"), None)
    if w4 and f32:
        ratio = w4["size_bytes"] / f32["size_bytes"]
        checks.append(target(
            "w4-gptq export <= 0.2x of the fp32 export's bytes, not slower at batch 64 (ort)",
            f"{ratio:.3f}x, {w4['speedup']:.2f}x vs {f32['speedup']:.2f}x",
            ratio <= 0.2 and w4["speedup"] >= f32["speedup"],
        ))  # fmt: skip
    return checks


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    header = (
        "| row | runtime | speedup vs torch fp32 | cos mean | cos min | 1-NN | bytes | ms | what |"
    )
    table = markdown_table(header, [table_row(r) for r in rows])
    return "\n\n".join([
        "# Deploying all-MiniLM-L6-v2 (minilm-topics) on torch, onnxruntime and OpenVINO",
        f"{setup['cpu']}. {setup['versions']}. Batch {BATCH} x 128 tokens, {THREADS} threads, "
        f"median of {setup['runs']} warm calls, each row timed alternately with torch fp32 "
        "eager in one process; cosine and 1-NN from the row's own embeddings of the 1,087 "
        "evaluation paragraphs. Bytes: the files the row runs from.",
        table, *batch_one_lines(setup.get("batch1")), format_targets(targets(rows)),
    ]) + "\n"  # fmt: skip


def batch_one_lines(figures: dict[str, float] | None) -> list[str]:
    if figures is None:
        return []
    met = figures["speedup"] > 1.0
    return [
        f"Batch 1 x 128 tokens on onnxruntime (median of 30 warm calls, alternating): fp32 "
        f"export {figures['fp32_ms']:.2f} ms, w4-gptq export {figures['w4_ms']:.2f} ms, "
        f"{figures['speedup']:.2f}x. Target: w4-gptq export faster at batch 1: "
        f"{'met' if met else 'NOT met'}."
    ]


def versions() -> str:
    from importlib import metadata

    out = []
    for pkg in ("torch", "onnxruntime", "openvino", "nncf"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} not installed")
    return ", ".join(out)


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", nargs="+", choices=list(ROWS))
    parser.add_argument(
        "--render", type=Path, help="Only print the tables of a results .json again."
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(markdown(saved["rows"], saved["setup"]))
        return
    import torch

    from slimkit.tasks import get

    torch.set_num_threads(THREADS)
    names = [n for n in ROWS if args.only is None or n in args.only or n == "fp32"]
    setup = {"cpu": cpu_line(), "versions": versions(), "runs": args.runs}
    print(setup["cpu"], flush=True)
    work = Path(tempfile.mkdtemp(prefix="deploy-minilm-"))
    try:
        bench = Bench(get(TASK), args.runs, work)
        rows = [measure(bench, name) for name in names]
        if args.only is None or "ort-w4-gptq" in args.only:
            setup["batch1"] = batch_one(bench)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, setup)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"deploy_minilm.{cpu_kind()}"
    write_text(RESULTS / f"{stem}.json", json.dumps({"setup": setup, "rows": rows}, indent=1))
    write_text(RESULTS / f"{stem}.md", text)


def batch_one(b: Bench, runs: int = 30) -> dict[str, float]:
    """w4-gptq's onnxruntime export against the fp32 export at batch 1 x 128 tokens, timed
    alternately: ``{"fp32_ms", "w4_ms", "speedup"}``."""
    from slimkit.deploy.runtime import RuntimeModel
    from slimkit.evaluate.latency import time_alternating

    models = [
        RuntimeModel(b.exported(r), "onnxruntime", threads=THREADS) for r in (None, "w4-gptq")
    ]
    base, w4 = time_alternating(
        models, b.task.latency_inputs(1), runs=runs, warmup=3, threads=THREADS
    )
    out = {"fp32_ms": base["median"], "w4_ms": w4["median"]}
    return {**out, "speedup": out["fp32_ms"] / out["w4_ms"]}


def cpu_kind() -> str:
    """The kind of CPU, for the results' file name: its fastest int8 / bf16 instructions."""
    from slimkit.cpu import cpu_flags, has_bf16, has_int8_dot

    if "amx_int8" in cpu_flags():
        return "amx"
    if has_bf16():
        return "avx512-bf16"
    return "vnni" if has_int8_dot() else "avx2"


if __name__ == "__main__":
    run()
