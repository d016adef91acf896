"""Does a CSR sparse kernel pay for unstructured-sparse Linear layers on this CPU?

Side by side in one process, 2 threads, median of warm runs, every variant of a row timed
alternately (``slimkit.evaluate.latency.time_alternating``):

- ``layers``: single ``SparseLinear`` layers (weight shape out x in: 4096x4096, 1536x384,
  384x1536, 300x784) at densities 0.5, 0.1, 0.05, 0.02 (random masks), batch 1 and 256
  rows: the layer with kernel ``dense``, ``csr`` and ``auto`` (its choice measured on the
  first, untimed call), the choice ``auto`` made, and the csr speedup over dense.
- ``model``: an MLP 784-4096-4096-10 pruned by magnitude to 95% (``unstructured`` method),
  saved and loaded back, run with ``SLIMKIT_SPARSE_KERNEL`` = dense, csr and auto (set around
  each call; the variable is read at forward time), against the unpruned fp32 model, at
  batch 1 and 256: speedups over fp32 and ``auto``'s choice per layer.

Prints both tables; writes ``benchmarks/results/sparse_kernel.{json,md}``.

    python benchmarks/sparse_kernel.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from _common import fmt, markdown_table, ratio
from torch import nn

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THREADS, RUNS, WARMUP = 2, 20, 3
SHAPES = ((4096, 4096), (1536, 384), (384, 1536), (300, 784))  # (out, in)
DENSITIES = (0.5, 0.1, 0.05, 0.02)
BATCHES = (1, 256)
KERNELS = ("dense", "csr", "auto")
MLP_SPARSITY = 0.95
ENV = "SLIMKIT_SPARSE_KERNEL"


# -- tables (pure) ----------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return fmt(value, ".3f")


def _ratio(num: float | None, den: float | None) -> str:
    """``num / den`` as ``2.50x``; ``-`` when either is missing or zero."""
    return ratio(num / den if num and den else None)


def layer_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| shape (out x in) | density | batch | dense ms | csr ms | auto ms | auto choice | "
        "csr speedup |"
    )
    body = []
    for r in rows:
        cells = [
            r["shape"],
            f"{r['density']:g}",
            str(r["batch"]),
            _ms(r.get("dense_ms")),
            _ms(r.get("csr_ms")),
            _ms(r.get("auto_ms")),
            r.get("auto_choice", "-"),
            _ratio(r.get("dense_ms"), r.get("csr_ms")),
        ]
        body.append(cells)
    return markdown_table(header, body)


def model_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | density | batch | fp32 ms | dense ms | csr ms | auto ms | auto choice | "
        "dense / csr / auto speedup vs fp32 |"
    )
    body = []
    for r in rows:
        base = r.get("fp32_ms")
        speedups = " / ".join(_ratio(base, r.get(f"{k}_ms")) for k in KERNELS)
        cells = [
            r["model"],
            f"{r['density']:.3f}",
            str(r["batch"]),
            _ms(base),
            _ms(r.get("dense_ms")),
            _ms(r.get("csr_ms")),
            _ms(r.get("auto_ms")),
            r.get("auto_choice", "-"),
            speedups,
        ]
        body.append(cells)
    return markdown_table(header, body)


def render(results: dict[str, Any]) -> str:
    return (
        "# Sparse Linear kernels: dense vs CSR vs auto\n\n"
        f"{results['description']}\n\n## Single layers\n\n"
        + layer_table(results["layers"])
        + "\n## Whole model\n\n"
        + model_table(results["model"])
    )


# -- helpers --------------------------------------------------------------------------------
@contextmanager
def kernel_env(kernel: str | None) -> Iterator[None]:
    """``SLIMKIT_SPARSE_KERNEL`` set to ``kernel`` (unset for None) inside the block."""
    saved = os.environ.pop(ENV, None)
    if kernel is not None:
        os.environ[ENV] = kernel
    try:
        yield
    finally:
        os.environ.pop(ENV, None)
        if saved is not None:
            os.environ[ENV] = saved


class WithKernel(nn.Module):
    """``model`` run with ``SLIMKIT_SPARSE_KERNEL`` set to ``kernel`` (None: unset)."""

    def __init__(self, model: nn.Module, kernel: str | None) -> None:
        super().__init__()
        self.model, self.kernel = model, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with kernel_env(self.kernel):
            return self.model(x)


def pruned_linear(out_f: int, in_f: int, density: float, seed: int = 0) -> nn.Linear:
    """A Linear keeping ``round(density * numel)`` random weights (the rest exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(in_f, out_f)
    with torch.no_grad():
        m.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        scores = torch.rand(out_f * in_f, generator=g)
        keep = torch.zeros(out_f * in_f, dtype=torch.bool)
        keep[scores.topk(max(1, round(density * keep.numel()))).indices] = True
        m.weight.mul_(keep.reshape(out_f, in_f))
    return m


def _median(lat: dict[str, Any]) -> float:
    return float(lat["median"])


# -- layers section ---------------------------------------------------------------------------
def layer_row(out_f: int, in_f: int, density: float, batch: int, runs: int) -> dict[str, Any]:
    """One shape, density and batch: the three kernels timed alternately."""
    from slimkit.evaluate.latency import time_alternating
    from slimkit.layers.sparse import SparseLinear, row_bucket

    dense = pruned_linear(out_f, in_f, density)
    layers = [SparseLinear.from_float(dense, kernel=k).eval() for k in KERNELS]
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(1))
    with kernel_env(None):
        lat = time_alternating(layers, x, runs, WARMUP, THREADS)
    row: dict[str, Any] = {"shape": f"{out_f}x{in_f}", "density": density, "batch": batch}
    for kernel, one in zip(KERNELS, lat, strict=True):
        row[f"{kernel}_ms"] = _median(one)
    auto = layers[2]
    row["auto_choice"] = auto.kernels_used().get(row_bucket(batch), "dense (density)")
    return row


def layers_section(runs: int) -> list[dict[str, Any]]:
    rows = []
    for out_f, in_f in SHAPES:
        for density in DENSITIES:
            for batch in BATCHES:
                row = layer_row(out_f, in_f, density, batch, runs)
                print("   " + layer_table([row]).splitlines()[2], flush=True)
                rows.append(row)
    return rows


# -- model section ----------------------------------------------------------------------------
class MLP(nn.Module):
    """784-4096-4096-10, ReLU between."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 4096)
        self.fc2 = nn.Linear(4096, 4096)
        self.fc3 = nn.Linear(4096, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def pruned_mlp(work: Path) -> tuple[nn.Module, Path]:
    """(fp32 MLP, the path of its artifact magnitude-pruned to 95%)."""
    import copy

    import slimkit

    torch.manual_seed(0)
    fp32 = MLP().eval()
    recipe = {
        "name": "mlp-95",
        "stages": [{"prune": {"method": "unstructured", "sparsity": MLP_SPARSITY}}],
    }
    pruned = slimkit.compress(copy.deepcopy(fp32), recipe)
    path = slimkit.save(pruned, work / "mlp-95", overwrite=True)
    return fp32, path


def model_section(runs: int, work: Path) -> list[dict[str, Any]]:
    import slimkit
    from slimkit.compressed import count_params
    from slimkit.evaluate.latency import time_alternating
    from slimkit.layers.sparse import SparseLinear, row_bucket

    fp32, path = pruned_mlp(work)
    # one loaded copy per kernel, so no copy's cached weight form is dropped by another's
    copies = {k: slimkit.load(path, model=MLP()).eval() for k in KERNELS}
    density = count_params(copies["dense"]) / count_params(fp32)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(2))
        models = [WithKernel(fp32, None), *(WithKernel(copies[k], k) for k in KERNELS)]
        lat = time_alternating(models, x, runs, WARMUP, THREADS)
        row: dict[str, Any] = {"model": "mlp 784-4096-4096-10", "density": density}
        row["batch"] = batch
        for name, one in zip(("fp32", *KERNELS), lat, strict=True):
            row[f"{name}_ms"] = _median(one)
        choices = []
        for name, layer in copies["auto"].named_modules():
            if isinstance(layer, SparseLinear):
                choice = layer.kernels_used().get(row_bucket(batch), "dense (density)")
                choices.append(f"{name} {choice}")
        row["auto_choice"] = ", ".join(choices)
        print("   " + model_table([row]).splitlines()[2], flush=True)
        rows.append(row)
    return rows


def description(runs: int, load: float) -> str:
    return (
        f"torch {torch.__version__}, {THREADS} threads on {os.cpu_count()} CPUs; median of "
        f"{runs} warm runs after {WARMUP} untimed rounds, the variants of each row timed "
        "alternately in one process; the machine's 1-minute load average reached "
        f"{load:.1f} while timing. Layers: random masks of exactly the density, weight shape "
        "out x in; 'auto' measured its choice on its first (untimed) call; 'dense (density)': "
        "auto runs dense without measuring above density 0.3. Model: the MLP pruned by "
        f"magnitude to {MLP_SPARSITY:.0%} (unstructured, layer scope), saved and loaded; the "
        "kernel set through SLIMKIT_SPARSE_KERNEL around each call; fp32 is the unpruned model."
    )


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="timed runs per variant")
    parser.add_argument("--section", nargs="+", choices=("layers", "model"))
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    sections = args.section or ["layers", "model"]
    print(f"{THREADS} threads (torch.set_num_threads), {args.runs} timed runs", flush=True)
    load = os.getloadavg()[0]
    results: dict[str, Any] = {"threads": THREADS, "runs": args.runs, "torch": torch.__version__}
    results["layers"] = layers_section(args.runs) if "layers" in sections else []
    load = max(load, os.getloadavg()[0])
    with tempfile.TemporaryDirectory(prefix="sparse-kernel-") as tmp:
        results["model"] = model_section(args.runs, Path(tmp)) if "model" in sections else []
    load = max(load, os.getloadavg()[0])
    results["description"] = description(args.runs, load)
    text = render(results)
    print("\n" + text, flush=True)
    write_text(RESULTS / "sparse_kernel.json", json.dumps(results, indent=2) + "\n")
    write_text(RESULTS / "sparse_kernel.md", text)


if __name__ == "__main__":
    run()
