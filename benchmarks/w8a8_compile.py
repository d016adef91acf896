"""Does torch.compile make w8a8 faster on this CPU? fp32 and w8a8, eager and compiled.

On ``minilm-topics``'s latency batch (64 x 128 tokens, 2 threads): the fp32 model and the
``w8a8`` recipe's model (compressed, saved, loaded back), each eager and through
``torch.compile`` (inductor, one fixed shape), all four timed alternately in one process
(median of warm runs; each model is compiled by a first call before any timing, and that
call's time is printed apart). Cosine of each output to fp32 eager's on the same batch
checks that the compiled models compute the same thing. Then one layer at a time, for
MiniLM's Linear shapes over 8192 tokens: fp32, fbgemm's int8 GEMM alone, and the w8a8
layer around that GEMM. Writes ``benchmarks/results/w8a8_compile.{json,md}``.

    python benchmarks/w8a8_compile.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THREADS = 2


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | median ms | speedup vs fp32 eager | cosine vs fp32 eager | compile s |",
        "|---|---|---|---|---|",
    ]
    base = rows[0]["median_ms"]
    for r in rows:
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(
            f"| {r['name']} | {r['median_ms']:.0f} | {base / r['median_ms']:.2f}x | "
            f"{r['cosine']:.5f} | {compile_s} |"
        )
    return "\n".join(lines) + "\n"


LAYER_SHAPES = ((384, 1536), (1536, 384), (384, 384))  # MiniLM's Linear layers (in, out)


def layer_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tokens x in -> out | fp32 F.linear ms | fbgemm int8 GEMM alone ms | "
        "w8a8 layer (fbgemm, SmoothQuant) ms |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['fp32_ms']:.1f} | {r['gemm_ms']:.1f} "
            f"({r['fp32_ms'] / r['gemm_ms']:.2f}x) | {r['layer_ms']:.1f} "
            f"({r['fp32_ms'] / r['layer_ms']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


def layer_rows(runs: int, tokens: int = 8192) -> list[dict[str, Any]]:
    """Per layer shape: fp32 Linear, fbgemm's int8 GEMM on its own (per-tensor activation
    quantization inside, nothing around it) and slimkit's w8a8 layer (per-token scaling and
    SmoothQuant around the same GEMM), timed alternately."""
    import torch
    from torch import nn

    from slimkit.evaluate.latency import time_alternating
    from slimkit.quant.w8a8 import DynamicQuantLinear

    class GemmAlone(nn.Module):
        def __init__(self, layer: DynamicQuantLinear) -> None:
            super().__init__()
            self.packed = layer._weight().packed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(x, self.packed, True)

    out = []
    gen = torch.Generator().manual_seed(0)
    for k, n in LAYER_SHAPES:
        fp32 = nn.Linear(k, n)
        smooth = torch.rand(k, generator=gen) + 0.5
        layer = DynamicQuantLinear.from_float(fp32, smooth, kernel="fbgemm")
        x = torch.randn(tokens, k, generator=gen)
        times = time_alternating([fp32, GemmAlone(layer), layer], x, runs=runs, threads=THREADS)
        fp32_ms, gemm_ms, layer_ms = (t["median"] for t in times)
        out.append(
            {
                "shape": f"{tokens} x {k} -> {n}",
                "fp32_ms": fp32_ms,
                "gemm_ms": gemm_ms,
                "layer_ms": layer_ms,
            }
        )
    return out


def pooled_cosine(a: Any, b: Any) -> float:
    """Mean over examples of the cosine between mean-over-tokens outputs."""
    import torch.nn.functional as F

    return float(F.cosine_similarity(a.mean(dim=1), b.mean(dim=1), dim=-1).mean())


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    import torch

    import slimkit
    from slimkit.data import call, first_tensor
    from slimkit.evaluate.latency import time_alternating
    from slimkit.tasks import get

    torch.set_num_threads(THREADS)
    task = get("minilm-topics")
    inputs = task.latency_inputs()
    fp32 = task.model()
    with tempfile.TemporaryDirectory() as tmp:
        path = slimkit.save(slimkit.compress(task.model(), "w8a8", task=task), Path(tmp) / "q")
        w8a8 = slimkit.load(path)
    models: dict[str, Any] = {"fp32 eager": fp32, "w8a8 eager": w8a8}
    compile_s: dict[str, float | None] = {"fp32 eager": None, "w8a8 eager": None}
    failed: dict[str, str] = {}
    for name, model in (("fp32 compiled", fp32), ("w8a8 compiled", w8a8)):
        compiled = torch.compile(model, dynamic=False)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                call(compiled, inputs)  # compiles for this shape
        except Exception as e:  # a model that does not compile is reported, not fatal
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        compile_s[name] = time.perf_counter() - start
        models[name] = compiled
    with torch.inference_mode():
        outs = {n: first_tensor(call(m, inputs)) for n, m in models.items()}
    timings = time_alternating(list(models.values()), inputs, runs=args.runs, threads=THREADS)
    rows = [
        {
            "name": name,
            "median_ms": t["median"],
            "cosine": pooled_cosine(outs[name], outs["fp32 eager"]),
            "compile_s": compile_s[name],
        }
        for name, t in zip(models, timings, strict=True)
    ]
    layers = layer_rows(args.runs) if "fbgemm" in torch.backends.quantized.supported_engines else []
    text = (
        f"# w8a8 eager and compiled\n\nminilm-topics, {task.latency_description()}, "
        f"{THREADS} threads, median of {args.runs} warm runs, torch {torch.__version__}.\n\n"
        + table(rows)
        + "".join(f"\n{name} failed to compile: {error}\n" for name, error in failed.items())
        + (
            "\nOne layer at a time (median of warm runs, speedup vs fp32):\n\n"
            + layer_table(layers)
        )
        * bool(layers)
    )
    result = {"rows": rows, "failed": failed, "layers": layers}
    write_text(RESULTS / "w8a8_compile.json", json.dumps(result, indent=2) + "\n")
    write_text(RESULTS / "w8a8_compile.md", text)
    print("\n" + text)


if __name__ == "__main__":
    run()
