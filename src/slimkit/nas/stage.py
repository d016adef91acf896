"""The ``nas`` stage (method ``evolution``): search the task's space for the most accurate
architecture within a cost limit, retrain it, and return it in place of the model.

The limit is absolute (``max_params``, ``max_macs``, ``max_latency_ms`` measured at
``latency_batch`` examples on ``latency_threads`` threads) or a fraction of the incoming
model (``max_params_ratio``, ``max_macs_ratio``); several limits all apply. The task
declares its space with ``search_space()`` and supplies the labelled ``train_data()``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from slimkit.atomic import write_text
from slimkit.compressed import count_params
from slimkit.config import Config
from slimkit.context import Context, Progress, StageResult
from slimkit.errors import ConfigError, DataError
from slimkit.evaluate.macs import count_macs
from slimkit.nas.search import Limits, SearchResult, Settings, search
from slimkit.registry import register

if TYPE_CHECKING:
    from slimkit.tasks.base import Task
    from slimkit.tasks.searched import SearchSpace


@dataclasses.dataclass(frozen=True)
class NasConfig(Config):
    kind: ClassVar[str] = "nas"
    method: ClassVar[str] = "evolution"

    population: int = 8
    generations: int = 4
    tournament: int = 3
    epochs: int = 5  # short training of each candidate
    final_epochs: int = 30  # the winner's retraining
    lr: float = 0.02
    batch_size: int = 128
    val_fraction: float = 0.2  # held out of the training data to score candidates
    seed: int = 0
    workers: int = 1
    cost: str | None = None  # Pareto cost: params or macs (default: macs when only MACs limited)
    max_params: int | None = None
    max_macs: int | None = None
    max_params_ratio: float | None = None
    max_macs_ratio: float | None = None
    max_latency_ms: float | None = None
    latency_batch: int = 256
    latency_threads: int = 1
    log: str | None = None  # JSON-lines trial log
    resume: bool = False  # reuse the trials of ``log`` made under the same settings
    plot: str | None = None  # write the Pareto plot of the trials here (PNG)

    def validate(self) -> None:
        for name in ("population", "generations", "epochs", "final_epochs", "batch_size"):
            low = 0 if name == "generations" else 1
            if getattr(self, name) < low:
                self.fail(name, f"an integer >= {low}")
        for name in ("tournament", "workers", "latency_batch", "latency_threads"):
            if getattr(self, name) < 1:
                self.fail(name, "an integer >= 1")
        if not self.lr > 0:
            self.fail("lr", "a number > 0")
        if not 0 < self.val_fraction < 1:
            self.fail("val_fraction", "a number in (0, 1)")
        if self.cost not in (None, "params", "macs"):
            self.fail("cost", "params or macs")
        for name in ("max_params", "max_macs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                self.fail(name, "an integer >= 1")
        for name in ("max_params_ratio", "max_macs_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                self.fail(name, "a number in (0, 1]: a fraction of the baseline model")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            self.fail("max_latency_ms", "a number > 0 (milliseconds)")
        limits = ("max_params", "max_macs", "max_params_ratio", "max_macs_ratio", "max_latency_ms")
        if all(getattr(self, name) is None for name in limits):
            self.fail("max_params", f"at least one limit: {', '.join(limits)}")
        if self.resume and self.log is None:
            self.fail("resume", "true only with a log file")

    def pareto_cost(self) -> str:
        if self.cost is not None:
            return self.cost
        macs_only = self.max_params is None and self.max_params_ratio is None
        macs_only = macs_only and (self.max_macs is not None or self.max_macs_ratio is not None)
        return "macs" if macs_only else "params"

    def settings(self) -> Settings:
        names = [f.name for f in dataclasses.fields(Settings) if f.name != "cost"]
        return Settings(**{n: getattr(self, n) for n in names}, cost=self.pareto_cost())


def space_of(task: Task | None) -> SearchSpace:
    """The task's search space, or ConfigError naming the task."""
    if task is None:
        raise ConfigError("nas.evolution: needs a task (its search_space() and train_data())")
    make = getattr(task, "search_space", None)
    space = make() if callable(make) else None
    if space is None:
        raise ConfigError(
            f"nas.evolution: task {task.name!r} declares no search space "
            "(search_space()); tasks with one: digits-lenet, digits-mlp"
        )
    return space  # type: ignore[no-any-return]


def limits_for(config: NasConfig, baseline: nn.Module, example: Any) -> Limits:
    """Absolute limits: the ratios taken of ``baseline``'s parameters and MACs."""

    def tighter(a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else min(a, b)

    max_params, max_macs = config.max_params, config.max_macs
    if config.max_params_ratio is not None:
        max_params = tighter(max_params, int(config.max_params_ratio * count_params(baseline)))
    if config.max_macs_ratio is not None:
        macs = count_macs(baseline, example)
        max_macs = tighter(max_macs, int(config.max_macs_ratio * macs))
    return Limits(
        max_params=max_params,
        max_macs=max_macs,
        max_latency_ms=config.max_latency_ms,
        latency_batch=config.latency_batch,
        latency_threads=config.latency_threads,
    )


def run_search(
    baseline: nn.Module, config: NasConfig, task: Task | None, progress: Progress | None = None
) -> SearchResult:
    """Search ``task``'s space under ``config``'s limits (ratios of ``baseline``)."""
    space = space_of(task)
    assert task is not None
    batches = task.train_data()
    if not batches:
        raise DataError(f"nas.evolution: task {task.name!r} has no labelled training data")
    if not all(isinstance(x, torch.Tensor) for x, _ in batches):
        raise DataError("nas.evolution: needs tensor inputs in the task's train_data()")
    x = torch.cat([x for x, _ in batches])  # type: ignore[misc]
    y = torch.cat([y for _, y in batches])
    example = task.example_inputs()
    limits = limits_for(config, baseline, example)
    latency = task.latency_inputs(config.latency_batch) if config.max_latency_ms else None
    result = search(
        space,
        x,
        y,
        example,
        limits,
        config.settings(),
        log=config.log,
        resume=config.resume,
        latency_inputs=latency,
        progress=progress,
    )
    if config.plot is not None:
        from slimkit.nas.plot import plot_trials

        plot_trials(result, config.plot, baseline_cost=_cost(baseline, example, result))
    return result


def _cost(model: nn.Module, example: Any, result: SearchResult) -> int:
    if result.settings.cost == "macs":
        return count_macs(model, example)
    return count_params(model)


def summary(result: SearchResult) -> str:
    w = result.winner
    return (
        f"nas: winner {w.genome.describe()} ({w.params:,} params, {w.macs:,} MACs, "
        f"validation accuracy {w.accuracy:.4f}) of {len(result.trials)} trials "
        f"({result.trained} trained by this run, {len(result.trials) - result.trained} taken "
        f"from the log; {result.rejected} drawn over the limit {result.limits.describe()}, "
        f"never trained) in {result.seconds:.1f} s"
    )


SEARCH_PLOT = "search_pareto.png"
SEARCH_FRONT = "search_front.json"


@register(NasConfig)
def apply(model: nn.Module, config: NasConfig, ctx: Context) -> StageResult:
    """The searched model; its record is the whole search (trials, front, winner), and its
    report files the search's Pareto plot (every trial, the front, the winner, the limit)
    and front."""
    result = run_search(model, config, ctx.task, ctx.report)
    ctx.report(summary(result))
    baseline_cost = _cost(model, ctx.task.example_inputs(), result) if ctx.task else None
    record = result.to_json()

    def plot(path: Path) -> None:
        from slimkit.nas.plot import plot_trials

        plot_trials(result, path, baseline_cost=baseline_cost)

    def front(path: Path) -> None:
        write_text(path, json.dumps(record, indent=2) + "\n")

    return StageResult(result.model, record=record, files={SEARCH_PLOT: plot, SEARCH_FRONT: front})
