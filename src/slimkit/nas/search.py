"""Evolutionary architecture search under a cost limit, with logged, resumable trials.

The population starts as ``population`` random genomes that satisfy the limits; every
generation makes ``population`` children, each a parent picked by tournament (the best of
``tournament`` random members: higher validation accuracy, then lower cost) with one gene
mutated, and keeps the best ``population`` distinct genomes of parents and children. A
candidate that breaks a limit is never trained (another mutation is drawn). Each trained
candidate gets a short training (``epochs`` of Adam, cosine-decayed, seeded by its genome
and the search seed) on the training part of the task's labelled training data and is
scored by accuracy on the held-out part; the test set is never seen. The winner (best
validation accuracy, ties to the cheaper) is retrained for ``final_epochs`` on all the
training data.

Trials run in this process or in ``workers`` spawned processes (one torch thread each, as
in this process while a trial runs): a trial's result depends only on its genome and the
settings, so any number of workers gives the same search. Every finished trial is appended
to the log as one JSON line (written with one ``write`` and fsynced); a resumed search
reads the trials logged under the same settings and trains only the others.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.compressed import count_params
from slimkit.context import Progress
from slimkit.data import Batch, call
from slimkit.errors import ConfigError
from slimkit.tasks.searched import Genome, SearchSpace, build
from slimkit.train.fit import fit, minibatches
from slimkit.train.optim import torch_optimizer

LOG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Limits:
    """Absolute limits (None: no limit); latency is measured at ``latency_batch`` examples
    with ``latency_threads`` torch threads (median of warm runs, milliseconds)."""

    max_params: int | None = None
    max_macs: int | None = None
    max_latency_ms: float | None = None
    latency_batch: int = 256
    latency_threads: int = 1

    def describe(self) -> str:
        parts = []
        if self.max_params is not None:
            parts.append(f"params <= {self.max_params:,}")
        if self.max_macs is not None:
            parts.append(f"MACs <= {self.max_macs:,}")
        if self.max_latency_ms is not None:
            parts.append(
                f"latency <= {self.max_latency_ms:g} ms (batch {self.latency_batch}, "
                f"{self.latency_threads} threads)"
            )
        return ", ".join(parts) or "no limit"


@dataclasses.dataclass(frozen=True)
class Settings:
    population: int = 8
    generations: int = 4
    tournament: int = 3
    epochs: int = 5
    final_epochs: int = 30
    lr: float = 0.02
    batch_size: int = 128
    val_fraction: float = 0.2
    seed: int = 0
    workers: int = 1
    cost: str = "params"  # the Pareto front's cost: "params" or "macs"

    def fingerprint(self, n_train: int, n_val: int) -> str:
        """What a trial's result depends on besides its genome."""
        keys = ("epochs", "lr", "batch_size", "val_fraction", "seed")
        what = {k: getattr(self, k) for k in keys} | {"n_train": n_train, "n_val": n_val}
        what["version"] = LOG_VERSION
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Trial:
    genome: Genome
    accuracy: float  # on the held-out part of the training data
    params: int
    macs: int
    seconds: float  # training time (0 for a trial read back from the log)

    def cost(self, what: str) -> int:
        return self.params if what == "params" else self.macs

    def to_dict(self) -> dict[str, Any]:
        return {
            "genome": self.genome.to_dict(),
            "description": self.genome.describe(),
            "val_accuracy": self.accuracy,
            "params": self.params,
            "macs": self.macs,
            "seconds": round(self.seconds, 3),
        }


@dataclasses.dataclass
class SearchResult:
    winner: Trial
    model: nn.Module  # the winner retrained for final_epochs, eval mode
    trials: list[Trial]  # every distinct candidate scored, in the order first scored
    front: list[Trial]  # the Pareto front of (accuracy, cost), cheapest first
    trained: int  # candidates trained by this run (the others came from the log)
    rejected: int  # candidates drawn that broke a limit (never trained)
    seconds: float
    limits: Limits
    settings: Settings

    def to_json(self) -> dict[str, Any]:
        return {
            "cost": self.settings.cost,
            "limits": dataclasses.asdict(self.limits),
            "settings": dataclasses.asdict(self.settings),
            "winner": self.winner.to_dict(),
            "front": [t.to_dict() for t in self.front],
            "trials": len(self.trials),
            "trained": self.trained,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 3),
        }


# -- the Pareto front (pure) --------------------------------------------------------------
def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, cost) ``a`` is at least as accurate and as cheap as ``b``, better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (accuracy, cost) points no other point dominates, cheapest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    front: list[int] = []
    best = -math.inf
    for i in order:  # by cost; a point is on the front when it beats every cheaper accuracy
        acc, cost = points[i]
        if acc > best or (front and points[front[-1]] == (acc, cost)):
            front.append(i)
            best = max(best, acc)
    return front


# -- training a candidate -----------------------------------------------------------------
def candidate_seed(genome: Genome, seed: int) -> int:
    """The training seed of ``genome`` in a search seeded ``seed``."""
    return int(hashlib.sha256(f"{seed}:{genome.key()}".encode()).hexdigest()[:8], 16)


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> nn.Module:
    """Cross-entropy (label smoothing 0.1) with Adam on the one-cycle learning-rate schedule
    (peak ``lr``) as the digits tasks train their models, minibatches shuffled by a generator
    seeded ``seed``; returns ``model`` in eval mode."""
    steps = max(1, epochs * -(-len(x) // batch_size))

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)

    fit(
        list(model.parameters()),
        minibatches(len(x), batch_size, torch.Generator().manual_seed(seed)),
        loss,
        epochs=epochs,
        optimizer=torch_optimizer(
            lambda ps: torch.optim.Adam(ps, lr=lr),
            lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps),
        ),
        model=model,
        check_finite=False,
    )
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model.eval()(x).argmax(dim=1) == y).float().mean())


Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_tr, y_tr, x_val, y_val


def train_trial(genome: dict[str, Any], seed: int, settings: Settings, data: Data) -> float:
    """Build ``genome``, train it briefly from ``seed`` on one thread, return its validation
    accuracy. Runs in a worker process or in this one; the global RNG is left as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(Genome.from_dict(genome))
            x_tr, y_tr, x_val, y_val = data
            train_model(model, x_tr, y_tr, settings.epochs, settings.lr, settings.batch_size, seed)
            return accuracy(model, x_val, y_val)
    finally:
        torch.set_num_threads(threads)


_WORKER_DATA: Data | None = None


def _init_worker(data: Data) -> None:
    global _WORKER_DATA
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    _WORKER_DATA = data


def _worker_trial(genome: dict[str, Any], seed: int, settings: Settings) -> tuple[float, float]:
    assert _WORKER_DATA is not None
    start = time.perf_counter()
    acc = train_trial(genome, seed, settings, _WORKER_DATA)
    return acc, time.perf_counter() - start


# -- the log ------------------------------------------------------------------------------
class TrialLog:
    """Append-only JSON lines, one per finished trial, each written whole and fsynced."""

    def __init__(self, path: str | os.PathLike[str], resume: bool) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            self.path.write_bytes(b"")
        elif self.path.exists():  # drop a torn last line (a crash mid-write) before appending
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(self.path, "rb+") as f:
                    f.truncate(keep)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def records(self) -> list[dict[str, Any]]:
        return read_log(self.path)

    def append(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The whole JSON-object lines of a trial log (a torn last line is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


# -- costs --------------------------------------------------------------------------------
def measure_latency(model: nn.Module, inputs: Batch, threads: int, runs: int = 5) -> float:
    """Median milliseconds of ``runs`` warm forward passes on ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        with torch.inference_mode():
            call(model, inputs)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                call(model, inputs)
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def layer_macs(model: nn.Module, inputs: Batch) -> int:
    """Multiply-adds of the Conv2d and Linear layers on ``inputs`` (forward hooks): the
    whole count for the searched models, equal to :func:`count_macs` there and much cheaper
    than its first call."""
    total = 0

    def hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out.numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.inference_mode():
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return total


class Costs:
    """Parameters, MACs (on one example) and, when limited, latency of genomes; cached."""

    def __init__(self, example: Batch, limits: Limits, latency_inputs: Batch | None) -> None:
        self.example, self.limits, self.latency_inputs = example, limits, latency_inputs
        self._cache: dict[str, dict[str, float]] = {}

    def of(self, genome: Genome) -> dict[str, float]:
        key = genome.key()
        if key not in self._cache:
            with torch.random.fork_rng(devices=[]):
                model = build(genome).eval()
            cost: dict[str, float] = {
                "params": count_params(model),
                "macs": layer_macs(model, self.example),
            }
            if self.limits.max_latency_ms is not None:
                if self.latency_inputs is None:
                    raise ConfigError("max_latency_ms needs latency inputs (a task)")
                cost["latency_ms"] = measure_latency(
                    model, self.latency_inputs, self.limits.latency_threads
                )
            self._cache[key] = cost
        return self._cache[key]

    def violations(self, genome: Genome) -> list[str]:
        """How ``genome`` breaks the limits, e.g. ``'12,345 params > 10,000'``; [] if it fits."""
        c, lim, out = self.of(genome), self.limits, []
        if lim.max_params is not None and c["params"] > lim.max_params:
            out.append(f"{int(c['params']):,} params > {lim.max_params:,}")
        if lim.max_macs is not None and c["macs"] > lim.max_macs:
            out.append(f"{int(c['macs']):,} MACs > {lim.max_macs:,}")
        if lim.max_latency_ms is not None and c["latency_ms"] > lim.max_latency_ms:
            out.append(f"{c['latency_ms']:.3f} ms > {lim.max_latency_ms:g} ms")
        return out

    def fits(self, genome: Genome) -> bool:
        return not self.violations(genome)


def check_feasible(space: SearchSpace, costs: Costs) -> None:
    """ConfigError naming the smallest cost found and the limit when no genome of the space
    (the cheapest ones checked) satisfies the limits."""
    candidates = space.smallest_candidates()
    if any(costs.fits(g) for g in candidates):
        return
    found = []
    for what, unit in (("params", "parameters"), ("macs", "MACs"), ("latency_ms", "ms")):
        limit = {
            "params": costs.limits.max_params,
            "macs": costs.limits.max_macs,
            "latency_ms": costs.limits.max_latency_ms,
        }[what]
        if limit is None:
            continue
        best = min(candidates, key=lambda g: costs.of(g)[what])
        value = costs.of(best)[what]
        shown = f"{value:.3f}" if what == "latency_ms" else f"{int(value):,}"
        found.append(f"{shown} {unit} ({best.describe()}) against the limit {limit:,}")
    raise ConfigError(
        f"no architecture in the search space satisfies {costs.limits.describe()}: "
        f"the smallest found has {'; '.join(found)}"
    )


# -- the search ---------------------------------------------------------------------------
def split_data(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> Data:
    """A seeded random split of the training data into (train, held-out validation)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(x) * val_fraction))
    val, tr = perm[:n_val], perm[n_val:]
    return x[tr], y[tr], x[val], y[val]


def search(
    space: SearchSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    example: Batch,
    limits: Limits,
    settings: Settings | None = None,
    *,
    log: str | os.PathLike[str] | None = None,
    resume: bool = False,
    latency_inputs: Batch | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Evolve architectures of ``space`` on the labelled training data ``(x, y)`` under
    ``limits``; return the winner retrained for ``settings.final_epochs``."""
    start = time.perf_counter()
    settings = settings or Settings()
    say = progress or (lambda _msg: None)
    costs = Costs(example, limits, latency_inputs)
    check_feasible(space, costs)  # before any training
    data = split_data(x, y, settings.val_fraction, settings.seed)
    fingerprint = settings.fingerprint(len(data[0]), len(data[2]))
    trial_log = TrialLog(log, resume) if log is not None else None
    logged: dict[str, float] = {}
    if trial_log is not None and resume:
        for record in trial_log.records():
            if record.get("fingerprint") == fingerprint and "key" in record:
                logged[record["key"]] = float(record["val_accuracy"])
        say(f"resuming: {len(logged)} trials in {log}")
    rng = random.Random(settings.seed)
    scored: dict[str, Trial] = {}
    counts = {"trained": 0, "rejected": 0}
    pool = _pool(settings.workers, data)

    def score(g: Genome, acc: float, seconds: float, trained: bool) -> Trial:
        c = costs.of(g)
        trial = Trial(g, acc, int(c["params"]), int(c["macs"]), seconds)
        if trained:  # logged as soon as it finishes; scored in a fixed order after the batch
            counts["trained"] += 1
            if trial_log is not None:
                trial_log.append({"key": g.key(), "fingerprint": fingerprint, **trial.to_dict()})
        return trial

    def evaluate(genomes: list[Genome]) -> None:
        pending: dict[str, Genome] = {}
        for g in genomes:
            key = g.key()
            if key in scored or key in pending:
                continue
            if key in logged:
                scored[key] = score(g, logged[key], 0.0, trained=False)
            else:
                pending[key] = g
        done: dict[str, Trial] = {}
        if pool is None:
            for key, g in pending.items():
                t0 = time.perf_counter()
                acc = train_trial(g.to_dict(), candidate_seed(g, settings.seed), settings, data)
                done[key] = score(g, acc, time.perf_counter() - t0, trained=True)
        else:
            futures = {
                pool.submit(
                    _worker_trial, g.to_dict(), candidate_seed(g, settings.seed), settings
                ): g
                for g in pending.values()
            }
            for fut in concurrent.futures.as_completed(futures):
                acc, seconds = fut.result()
                g = futures[fut]
                done[g.key()] = score(g, acc, seconds, trained=True)
        scored.update((key, done[key]) for key in pending)

    def rank(g: Genome) -> tuple[float, int, str]:
        t = scored[g.key()]
        return (-t.accuracy, t.cost(settings.cost), g.key())

    def draw(make: Callable[[], Genome], tries: int = 50) -> Genome | None:
        """A genome from ``make`` that fits the limits, preferring one not yet scored."""
        seen = None
        for _ in range(tries):
            g = make()
            if not costs.fits(g):
                counts["rejected"] += 1
                continue
            if g.key() not in scored:
                return g
            seen = seen or g
        return seen

    try:
        population: list[Genome] = []
        for _ in range(settings.population):
            g = draw(lambda: space.sample(rng))
            if g is not None and all(g.key() != p.key() for p in population):
                population.append(g)
        if not population:
            population = [next(g for g in space.smallest_candidates() if costs.fits(g))]
        evaluate(population)
        say(f"generation 0: {len(scored)} trials, best {_best(scored, settings):.4f}")
        for gen in range(1, settings.generations + 1):
            children = []
            child = functools.partial(_child, space, list(population), rank, settings, rng)
            for _ in range(settings.population):
                g = draw(child)
                if g is not None:
                    children.append(g)
            evaluate(children)
            merged = {g.key(): g for g in population + children}
            population = sorted(merged.values(), key=rank)[: settings.population]
            say(f"generation {gen}: {len(scored)} trials, best {_best(scored, settings):.4f}")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if trial_log is not None:
            trial_log.close()

    trials = list(scored.values())
    winner = min(trials, key=lambda t: rank(t.genome))
    say(f"retraining the winner ({winner.genome.describe()}) for {settings.final_epochs} epochs")
    model = final_model(winner.genome, data, settings)
    points = [(t.accuracy, float(t.cost(settings.cost))) for t in trials]
    front = [trials[i] for i in pareto_front(points)]
    return SearchResult(
        winner=winner,
        model=model,
        trials=trials,
        front=front,
        trained=counts["trained"],
        rejected=counts["rejected"],
        seconds=time.perf_counter() - start,
        limits=limits,
        settings=settings,
    )


def _child(
    space: SearchSpace,
    parents: list[Genome],
    rank: Callable[[Genome], Any],
    settings: Settings,
    rng: random.Random,
) -> Genome:
    """A parent picked by tournament, one gene mutated."""
    entrants = rng.sample(parents, min(settings.tournament, len(parents)))
    return space.mutate(min(entrants, key=rank), rng)


def final_model(genome: Genome, data: Data, settings: Settings) -> nn.Module:
    """``genome`` trained for ``final_epochs`` on all the training data (train + held out)."""
    x = torch.cat([data[0], data[2]])
    y = torch.cat([data[1], data[3]])
    seed = candidate_seed(genome, settings.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trials: small layers run faster on one thread
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(genome)
            return train_model(
                model, x, y, settings.final_epochs, settings.lr, settings.batch_size, seed
            )
    finally:
        torch.set_num_threads(threads)


def _best(scored: dict[str, Trial], settings: Settings) -> float:
    return max((t.accuracy for t in scored.values()), default=float("nan"))


def _pool(workers: int, data: Data) -> concurrent.futures.ProcessPoolExecutor | None:
    if workers <= 1:
        return None
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(data,),
    )
