"""Evaluate candidate models on a task, side by side, into a Report."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from slimkit.compressed import CompressedModule, count_params, is_simulated
from slimkit.context import Progress
from slimkit.deploy import exported_files
from slimkit.evaluate.latency import time_alternating
from slimkit.evaluate.macs import count_macs
from slimkit.evaluate.memory import peak_forward_bytes, rss_growth_bytes
from slimkit.evaluate.result import Report, Result
from slimkit.evaluate.size import artifact_size
from slimkit.model_info import info

if TYPE_CHECKING:
    from slimkit.tasks.base import Task


@dataclass
class Candidate:
    """A model to evaluate and the artifact directory it was saved to (for its size)."""

    name: str
    model: nn.Module
    artifact_dir: Path
    recipe: str | None = None
    notes: list[str] = field(default_factory=list)
    #: what runs ``model``: torch, or the runtime of an export (``slimkit.deploy``)
    runtime: str = "torch"
    #: an export's directory (its files are the size) and the torch model it was made from
    #: (its parameters and MACs are the export's)
    exported_dir: Path | None = None
    source: nn.Module | None = None


def evaluate_candidates(
    task: Task,
    candidates: Sequence[Candidate],
    *,
    runs: int = 10,
    warmup: int = 2,
    batch: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> Report:
    """Measure every candidate on ``task``; the first candidate is the report's baseline.

    Latency is measured last, for all candidates together, alternating between them.
    """
    if not candidates:
        raise ValueError("evaluate_candidates needs at least one candidate")
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    step = progress or _no_progress
    inputs = task.latency_inputs(batch)
    results = [_measure(task, c, inputs, step) for c in candidates]
    step(f"timing {len(candidates)} model(s), {runs} alternating runs")
    models = [c.model for c in candidates]
    latencies = time_alternating(models, inputs, runs=runs, warmup=warmup, threads=threads)
    for result, latency in zip(results, latencies, strict=True):
        result.latency_ms = latency
    return Report(task=task.name, results=results)


def evaluate_model(
    model: nn.Module,
    task: Task,
    artifact_dir: str | Path | None = None,
    runs: int = 10,
) -> Result:
    """Measure one model on ``task``; it is saved to a temporary artifact when no dir is given."""
    recipe = _recipe_name(model)
    name = recipe or "model"
    if artifact_dir is not None:
        return _single(task, Candidate(name, model, Path(artifact_dir), recipe), runs)
    from slimkit.io.artifact import save

    with tempfile.TemporaryDirectory(prefix="slimkit-eval-") as tmp:
        path = save(model, Path(tmp) / "artifact", task=task)
        return _single(task, Candidate(name, model, Path(path), recipe), runs)


def _single(task: Task, candidate: Candidate, runs: int) -> Result:
    return evaluate_candidates(task, [candidate], runs=runs).results[0]


def _measure(task: Task, cand: Candidate, inputs: Any, step: Progress) -> Result:
    """Everything but latency (filled in later, when all candidates are timed together)."""
    model = cand.model
    step(f"{cand.name}: task metrics")
    metrics = {k: float(v) for k, v in task.evaluate(model).items()}
    robustness: dict[str, float] = {}
    if cand.exported_dir is None:  # an export's robustness is its torch row's (same weights)
        step(f"{cand.name}: robustness")
        robustness = {k: float(v) for k, v in task.robustness(model).items()}
    step(f"{cand.name}: size, params, MACs, memory")
    torch_model = cand.source or model
    if cand.exported_dir is None:
        size, peak = artifact_size(cand.artifact_dir), peak_forward_bytes(model, inputs)
    else:
        size = sum(exported_files(cand.exported_dir).values())
        peak = size + rss_growth_bytes(model, inputs)
    return Result(
        name=cand.name,
        recipe=cand.recipe,
        metrics=metrics,
        primary_metric=task.primary_metric,
        size_bytes=size,
        params=count_params(torch_model),
        macs=count_macs(torch_model, task.example_inputs()),
        latency_ms={},
        peak_mem_bytes=peak,
        robustness=robustness,
        simulated=is_simulated(torch_model),
        notes=[*cand.notes, *layer_notes(torch_model)],
        runtime=cand.runtime,
    )


def runtime_candidates(
    task: Task,
    candidates: Sequence[Candidate],
    runtimes: Sequence[str],
    workdir: Path,
    threads: int | None = None,
) -> list[Candidate]:
    """Each torch candidate exported to each of ``runtimes`` (into ``workdir``) and run
    there: ``NAME@RUNTIME`` candidates whose metrics come from the runtime's own outputs."""
    from slimkit.deploy import export
    from slimkit.deploy.runtime import RuntimeModel

    out = []
    for cand in candidates:
        for runtime in runtimes:
            fmt = "openvino" if runtime == "openvino" else "onnx"
            dest = workdir / f"{cand.name}-{runtime}"
            path = export(cand.model, dest, fmt, task.example_inputs())
            note = f"exported to {fmt}, run by {runtime}"
            out.append(
                Candidate(
                    name=f"{cand.name}@{runtime}",
                    model=RuntimeModel(path, runtime, threads=threads),
                    artifact_dir=cand.artifact_dir,
                    recipe=cand.recipe,
                    notes=[note],
                    runtime=runtime,
                    exported_dir=path,
                    source=cand.model,
                )
            )
    return out


def layer_notes(model: nn.Module) -> list[str]:
    """One line per distinct compressed layer kind, e.g. ``"12 x QuantLinear: int8 ..."``."""
    counts: Counter[tuple[str, str]] = Counter(
        (type(m).__name__, m.describe()) for m in model.modules() if isinstance(m, CompressedModule)
    )
    return [f"{n} x {kind}: {text}" for (kind, text), n in counts.items()]


def _recipe_name(model: nn.Module) -> str | None:
    recipe = info(model).get("recipe")
    name = recipe.get("name") if isinstance(recipe, dict) else None
    return str(name) if name else None


def _no_progress(description: str) -> None:
    del description
