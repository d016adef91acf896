"""SmolLM2-135M-Instruct (task smollm2): weight-only 4-bit recipes against the fp32 model.

Rows: fp32 (the baseline: the packaged GGUF's weights in fp32), round-to-nearest and GPTQ
(act-order) at 4 bits, symmetric, groups of 32, every Linear of the decoder blocks (the tied
embedding / output head stays fp32). Each row: perplexity on the task's evaluation windows
(8 x 512 tokens of the pydoc text), mean KL and top-1 agreement of the next-token
distributions against fp32, compress time. Prints the CPU model and flags, the table and the
issue's target 1; writes ``benchmarks/results/llm.<cpu>.{json,md}``.

    python benchmarks/llm.py [--only rtn-w4-g32 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _common import cpu_line, format_targets, markdown_table, target
from deploy_minilm import cpu_kind

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THREADS = 2
WEIGHTS = {
    "bits": 4, "granularity": "per_group", "group_size": 32, "symmetric": True,
    "targets": ["*"], "ignore": ["lm_head", "model.embed_tokens"],
}  # fmt: skip
RECIPES: dict[str, dict[str, Any]] = {
    "rtn-w4-g32": {"method": "rtn"},
    "gptq-w4-g32": {"method": "gptq", "act_order": True, "damp": 0.01, "block_size": 128},
}


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(RECIPES))
    args = parser.parse_args(argv)
    import torch

    import slimkit
    from slimkit.tasks import get

    torch.set_num_threads(THREADS)
    setup = {"cpu": cpu_line()}
    print(setup["cpu"], flush=True)
    task = get("smollm2")
    rows = [{"name": "fp32", "metrics": task.evaluate(task.model())}]
    print(rows[-1], flush=True)
    for name, options in RECIPES.items():
        if args.only is not None and name not in args.only:
            continue
        recipe = {"stages": [{"quantize": {**WEIGHTS, **options}}]}
        start = time.perf_counter()
        model = slimkit.compress(task.model(), recipe, task=task)
        seconds = time.perf_counter() - start
        rows.append({"name": name, "metrics": task.evaluate(model), "compress_s": seconds})
        print(rows[-1], flush=True)
        del model
    text = markdown(rows, setup)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"llm.{cpu_kind()}"
    write_text(RESULTS / f"{stem}.json", json.dumps({"setup": setup, "rows": rows}, indent=1))
    write_text(RESULTS / f"{stem}.md", text)


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    base = rows[0]["metrics"]["perplexity"]
    header = "| row | perplexity | increase | KL mean | top-1 agreement | compress s |"
    body = [
        [
            r["name"], f"{r['metrics']['perplexity']:.3f}",
            f"{r['metrics']['perplexity'] - base:+.3f}", f"{r['metrics']['kl_mean']:.4f}",
            f"{r['metrics']['top1_agreement']:.4f}",
            f"{r['compress_s']:.1f}" if "compress_s" in r else "-",
        ]
        for r in rows
    ]  # fmt: skip
    by = {r["name"]: r["metrics"]["perplexity"] - base for r in rows}
    checks = []
    if "rtn-w4-g32" in by and "gptq-w4-g32" in by:
        ratio = by["gptq-w4-g32"] / by["rtn-w4-g32"]
        checks.append(target(
            "GPTQ's perplexity increase at most half of RTN's (4-bit, groups of 32)",
            f"{by['gptq-w4-g32']:+.3f} vs {by['rtn-w4-g32']:+.3f} ({ratio:.2f} of RTN's)",
            ratio <= 0.5,
        ))  # fmt: skip
    return "\n\n".join([
        "# SmolLM2-135M-Instruct (smollm2): 4-bit weights against fp32",
        f"{setup['cpu']}. {THREADS} threads. Perplexity on 8 windows of 512 tokens of the pydoc "
        "text's evaluation part; KL and top-1 agreement of next-token distributions against "
        "the fp32 model; the tied embedding / head stays fp32.",
        markdown_table(header, body), format_targets(checks),
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    run()
