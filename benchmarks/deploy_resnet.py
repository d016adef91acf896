"""digits-resnet structured-50 exported: the pruned ResNet against the fp32 one on each
runtime (onnxruntime, OpenVINO), and its accuracy there against the torch artifact's.

Each runtime's pair (fp32 export, structured-50 export) is timed alternately in this process,
median of warm calls at the task's latency batch (256 images) and at batch 1, 2 threads;
accuracy comes from each export's own outputs on the test images. Prints the CPU model and
flags, the table and the issue's target; writes
``benchmarks/results/deploy_resnet.<cpu>.{json,md}``.

    python benchmarks/deploy_resnet.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_line, format_targets, markdown_table, target
from deploy_minilm import cpu_kind, versions

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "digits-resnet"
RECIPE = "structured-50"
THREADS = 2
SPEEDUP = 1.8


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    import torch

    import slimkit
    from slimkit.deploy.choose import installed_runtimes
    from slimkit.deploy.runtime import RuntimeModel
    from slimkit.evaluate.latency import time_alternating
    from slimkit.tasks import get

    torch.set_num_threads(THREADS)
    setup = {"cpu": cpu_line(), "versions": versions(), "runs": args.runs}
    print(setup["cpu"], flush=True)
    task = get(TASK)
    work = Path(tempfile.mkdtemp(prefix="deploy-resnet-"))
    rows: list[dict[str, Any]] = []
    try:
        start = time.perf_counter()
        pruned = slimkit.compress(task.model(), RECIPE, task=task)
        compress_s = time.perf_counter() - start
        slimkit.save(pruned, work / RECIPE)
        pruned = slimkit.load(work / RECIPE)
        torch_accuracy = {"fp32": task.evaluate(task.model())["accuracy"]}
        torch_accuracy[RECIPE] = task.evaluate(pruned)["accuracy"]
        models = {"fp32": task.model(), RECIPE: pruned}
        for runtime in installed_runtimes():
            fmt = "openvino" if runtime == "openvino" else "onnx"
            loaded = {}
            for name, model in models.items():
                path = slimkit.export(model, work / f"{name}-{fmt}", fmt, task.example_inputs())
                loaded[name] = RuntimeModel(path, runtime, threads=THREADS)
            for batch in (task.default_batch, 1):
                inputs = task.latency_inputs(batch)
                base, cand = time_alternating(
                    list(loaded.values()), inputs, runs=args.runs, warmup=3, threads=THREADS
                )
                accuracy = task.evaluate(loaded[RECIPE])["accuracy"]
                rows.append({
                    "runtime": runtime, "batch": batch, "fp32_ms": base["median"],
                    "pruned_ms": cand["median"], "speedup": base["median"] / cand["median"],
                    "fp32_accuracy": task.evaluate(loaded["fp32"])["accuracy"],
                    "accuracy": accuracy, "torch_accuracy": torch_accuracy[RECIPE],
                })  # fmt: skip
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, setup, compress_s)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"deploy_resnet.{cpu_kind()}"
    write_text(RESULTS / f"{stem}.json", json.dumps({"setup": setup, "rows": rows}, indent=1))
    write_text(RESULTS / f"{stem}.md", text)


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any], compress_s: float) -> str:
    header = (
        "| runtime | batch | fp32 export ms | structured-50 export ms | speedup | "
        "accuracy fp32 export | accuracy structured-50 export | accuracy torch artifact |"
    )
    body = [
        [
            r["runtime"], str(r["batch"]), f"{r['fp32_ms']:.2f}", f"{r['pruned_ms']:.2f}",
            f"{r['speedup']:.2f}x", f"{100 * r['fp32_accuracy']:.2f}",
            f"{100 * r['accuracy']:.2f}", f"{100 * r['torch_accuracy']:.2f}",
        ]
        for r in rows
    ]  # fmt: skip
    checks = []
    for r in rows:
        if r["batch"] == 1:
            continue
        same = r["accuracy"] == r["torch_accuracy"]
        checks.append(target(
            f"{r['runtime']}: structured-50 export >= {SPEEDUP}x the fp32 export, accuracy "
            "identical to the torch artifact's",
            f"{r['speedup']:.2f}x, {100 * r['accuracy']:.2f} vs {100 * r['torch_accuracy']:.2f}",
            r["speedup"] >= SPEEDUP and same,
        ))  # fmt: skip
    return "\n\n".join([
        f"# {TASK} {RECIPE} exported, against the fp32 export on the same runtime",
        f"{setup['cpu']}. {setup['versions']}. {THREADS} threads, median of {setup['runs']} "
        "warm calls, the two exports of a runtime timed alternately in one process; accuracy "
        f"from each export's own outputs on the test images. Compress time {compress_s:.1f} s.",
        markdown_table(header, body), format_targets(checks),
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    run()
