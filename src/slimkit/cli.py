"""Command line: ``slimkit tasks | compress | eval | demo | search``.

Exit codes: 0 ok; 2 bad input or usage (one clear line, no traceback); 1 internal error;
128 + the signal's number when interrupted (130 for Ctrl-C, 143 for SIGTERM).

``compress`` builds its whole output directory (the artifact and its report) in a staging
directory beside ``--out`` and swaps it in at the end, so ``--out`` only ever holds the old
model with its report or the new model with its report. The fp32 baseline it compares
against is a scratch directory ``.<out name>.slimkit-baseline.<pid>.<hex>`` beside ``--out``
(beside the artifact for ``eval``), removed on the way out, on SIGINT and SIGTERM too; one
left by a killed run is removed by the next run for the same output (``io/scratch.py``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from slimkit import pipeline
from slimkit.errors import ConfigError, SlimkitError, TaskError
from slimkit.recipe import Recipe, resolve

if TYPE_CHECKING:
    from torch import nn

    from slimkit.evaluate.result import Report
    from slimkit.evaluate.runner import Candidate
    from slimkit.tasks.base import Task

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make trained PyTorch models smaller and faster, and measure what it cost.",
)
console = Console()
err_console = Console(stderr=True)

#: the demo: each task's recipes (run on torch and every installed runtime)
DEMO: dict[str, tuple[str, ...]] = {
    "digits-resnet": ("structured-50",),
    "minilm-topics": ("w8a8", "w4-gptq", "bf16"),
}
#: the demo's latency batch where it is smaller than the task's (the benchmarks time the full one)
DEMO_BATCH = {"minilm-topics": 16}
#: how far a faithful row's primary metric may fall below the baseline's, by metric
FAITHFUL = {"accuracy": 0.01, "cosine_mean": 0.003}

TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Built-in task name (see `tasks`).")]
ModelDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--model-dir", help="Hugging Face model directory (task hf), or a .gguf file (hf-causal)."
    ),
]
DataOpt = Annotated[
    Path | None, typer.Option("--data", help="JSONL data file (task hf; .txt too for hf-causal).")
]
RunsOpt = Annotated[int, typer.Option("--runs", min=10, help="Timed warm runs per model.")]
BatchOpt = Annotated[int | None, typer.Option("--batch", min=1, help="Latency batch size.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="Torch CPU threads.")]
RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="Where to run the models, comma-separated: torch, onnxruntime, openvino "
        "(each model is exported to the others and evaluated there too).",
    ),
]


class Interrupted(BaseException):
    """A signal (SIGINT or SIGTERM) arrived while a command ran. Not a KeyboardInterrupt:
    typer would turn that into a silent exit 130."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While the body runs, SIGINT and SIGTERM raise ``Interrupted``, so that every ``with``
    block on the way out removes its scratch directories; the previous handlers come back
    afterwards. Only the main thread can handle signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _baseline_dir(beside: Path, elsewhere: bool = False) -> Iterator[Path]:
    """A locked scratch directory for the temporary fp32 baseline beside ``beside`` (stale ones
    of the same name tidied first), removed on the way out. ``elsewhere``: where that parent
    is not writable, use the system's temporary directory instead of failing."""
    from slimkit.errors import ArtifactError
    from slimkit.io import scratch

    near = Path(os.path.abspath(beside))
    places = [near, Path(tempfile.gettempdir()) / near.name] if elsewhere else [near]
    for i, place in enumerate(places):
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            scratch.tidy(place)
            made = scratch.create(place, "baseline")
        except OSError as e:
            if i + 1 < len(places):
                continue
            raise ArtifactError(f"cannot write {place.parent}: {e.strerror or e}") from e
        with made:
            yield made.path
        return


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str], None]]:
    """A rich progress display; yields ``step(description)`` marking each unit of work."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        job = bar.add_task("starting", total=None)

        def step(description: str) -> None:
            bar.update(job, description=description)

        yield step


def _make_task(name: str, model_dir: Path | None, data: Path | None) -> Task:
    from slimkit import tasks

    if name == "hf":
        if model_dir is None or data is None:
            raise TaskError("task 'hf' needs --model-dir DIR and --data FILE.jsonl")
        return tasks.get("hf", model_dir=model_dir, data=data)
    if name == "hf-causal":  # --model-dir: a Hugging Face directory or a GGUF file
        if model_dir is None:
            raise TaskError("task 'hf-causal' needs --model-dir DIR (or a .gguf file)")
        where = {"gguf" if model_dir.suffix.lower() == ".gguf" else "model_dir": model_dir}
        return tasks.get("hf-causal", **where, data=data)
    if model_dir is not None or data is not None:
        raise TaskError(f"--model-dir and --data go with --task hf or hf-causal, not {name!r}")
    return tasks.get(name)


@app.command("tasks")
def tasks_cmd() -> None:
    """List the built-in tasks."""
    from slimkit import tasks

    table = Table(title="built-in tasks")
    table.add_column("task")
    table.add_column("description")
    for name, description in tasks.describe():
        table.add_row(name, description)
    console.print(table)


@app.command("compress")
def compress_cmd(
    task: TaskOpt,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe YAML (or shipped name).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    model_dir: ModelDirOpt = None,
    data: DataOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an artifact.")] = False,
    runs: RunsOpt = 10,
    batch: BatchOpt = None,
    threads: ThreadsOpt = None,
    runtime: RuntimeOpt = "torch",
) -> None:
    """Evaluate the baseline, compress, save, reload from disk, evaluate, report."""
    from slimkit.io.artifact import check_target
    from slimkit.io.save import Staging, io_errors

    runtimes = _runtimes(runtime)
    rec = Recipe.from_file(resolve(recipe))  # every input checked before any work
    how = "pass --overwrite"
    check_target(out, overwrite, how=how)
    the_task = _make_task(task, model_dir, data)
    with (
        _signals_raise(),
        Staging(out, overwrite, how=how) as stage,  # --out's parent is writable: checked here
        _baseline_dir(out) as tmp,
        _progress() as step,
    ):
        step(f"loading {the_task.name}")
        model = the_task.model()
        pipeline.precheck(model, rec)  # finite weights, patterns that match: before any work
        baseline = _baseline(model, the_task, tmp / "fp32", step)
        candidate = _compressed(model, rec, the_task, stage.path, step)
        cands = _on_runtimes(the_task, [baseline, candidate], runtimes, tmp, threads, step)
        report = _evaluate(the_task, cands, runs, batch, threads, step)
        with io_errors(stage.path):  # beside the new model, before it is swapped in
            _write_reports([report], stage.path)
        stage.commit()
    _finish([report], out, written=True)


@app.command("eval")
def eval_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task to evaluate on.")] = None,
    model_dir: ModelDirOpt = None,
    data: DataOpt = None,
    runs: RunsOpt = 10,
    batch: BatchOpt = None,
    threads: ThreadsOpt = None,
    runtime: RuntimeOpt = "torch",
) -> None:
    """Evaluate an artifact beside its task's fp32 baseline."""
    from slimkit.io.artifact import load, read_manifest

    runtimes = _runtimes(runtime)
    manifest = read_manifest(artifact)
    the_task = _artifact_task(artifact, manifest, task, model_dir, data)
    recipe_name = (manifest.get("recipe") or {}).get("name")
    with _signals_raise(), _baseline_dir(artifact, elsewhere=True) as tmp, _progress() as step:
        step(f"loading {artifact}")
        model = load(artifact)
        baseline = _baseline(the_task.model(), the_task, tmp / "fp32", step)
        candidate = _candidate(recipe_name or artifact.name, model, artifact, recipe_name)
        cands = _on_runtimes(the_task, [baseline, candidate], runtimes, tmp, threads, step)
        report = _evaluate(the_task, cands, runs, batch, threads, step)
    _show(report)


@app.command("export")
def export_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    format: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="onnx, openvino, or auto (the fastest faithful, measured here)."
        ),
    ] = "onnx",
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task of the inputs.")] = None,
    model_dir: ModelDirOpt = None,
    data: DataOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an export.")] = False,
    runs: Annotated[int, typer.Option(min=1, help="Timed calls per runtime (auto).")] = 5,
) -> None:
    """Export an artifact to a runtime's own model, its weights kept compressed."""
    from slimkit.deploy import CHOICES, META, export, exported_files
    from slimkit.io.artifact import load, read_manifest

    if format not in CHOICES:
        raise ConfigError(f"--format {format!r}; allowed: {', '.join(CHOICES)}")
    manifest = read_manifest(artifact)
    the_task = _artifact_task(artifact, manifest, task, model_dir, data)
    with _signals_raise(), _progress() as step:
        step(f"loading {artifact}")
        model = load(artifact)
        step("timing every installed runtime" if format == "auto" else f"exporting to {format}")
        path = export(
            model, out, format, the_task.example_inputs(), overwrite=overwrite,
            inputs=the_task.latency_inputs(), runs=runs,
        )  # fmt: skip
    chosen = json.loads((path / META).read_text()).get("chosen")
    if chosen is not None:
        console.print(f"measured on {chosen['device']} ({the_task.latency_description()}):")
        for row in chosen["measured"]:
            mark = "  <- written" if row["runtime"] == chosen["runtime"] else ""
            console.print(
                f"  {row['runtime']}: {row['median_ms']:.1f} ms, cosine {row['cosine']:.5f}"
                f"{'' if row['faithful'] else ' (not faithful)'}{mark}"
            )
    for name, size in exported_files(path).items():
        console.print(f"{path / name}: {size:,} bytes")


def _artifact_task(
    artifact: Path,
    manifest: dict[str, object],
    task: str | None,
    model_dir: Path | None,
    data: Path | None,
) -> Task:
    """The task named by ``--task``, else the one the artifact records."""
    from slimkit import tasks

    if task is not None:
        return _make_task(task, model_dir, data)
    source = manifest["source"]
    if isinstance(source, dict) and "task" in source:
        return tasks.from_source(source)
    raise TaskError(f"{artifact} records no task; pass --task")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path(
        "slimkit-demo"
    ),
    runs: RunsOpt = 10,
) -> None:
    """Shipped recipes on digits-resnet and minilm-topics, on torch and every installed
    runtime; a combined report in OUT and the fastest faithful row of each task."""
    import importlib.util

    from slimkit import tasks
    from slimkit.deploy.runtime import RUNTIMES
    from slimkit.io.save import Staging

    runtimes = [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]
    reports = []
    for name, names in DEMO.items():
        recipes = [Recipe.from_file(resolve(r)) for r in names]
        the_task = tasks.get(name)
        with _signals_raise(), _progress() as step, _baseline_dir(out / name) as tmp:
            step(f"loading {name}")
            model = the_task.model()
            cands = [_baseline(model, the_task, out / name / "fp32", step, overwrite=True)]
            for rec in recipes:
                dest = out / name / rec.name
                with Staging(dest, overwrite=True) as stage:
                    cand = _compressed(copy.deepcopy(model), rec, the_task, stage.path, step)
                    stage.commit()
                cand.artifact_dir = dest
                cands.append(cand)
            cands = _on_runtimes(the_task, cands, runtimes, tmp, None, step)
            report = _evaluate(the_task, cands, runs, DEMO_BATCH.get(name), None, step)
        _finish([report], out / name)
        reports.append(report)
    from slimkit.report.write import write_report

    write_report(reports, out)
    console.print(
        f"combined report: {out / 'report.md'}, {out / 'report.json'}, {out / 'pareto.png'}"
    )
    for report in reports:
        console.print(_fastest_faithful(report))


def _fastest_faithful(report: Report) -> str:
    """One line: the fastest row whose primary metric stays within ``FAITHFUL`` of the
    baseline's (speedups against the torch fp32 baseline, measured alternately)."""
    base = report.baseline
    metric = base.primary_metric
    slack = FAITHFUL.get(metric, 0.01)
    faithful = [
        r for r in report.results[1:]
        if r.primary() >= base.primary() - slack and r.latency_ms and not r.simulated
    ]  # fmt: skip
    if not faithful:
        return f"{report.task}: no row keeps {metric} within {slack} of fp32"
    best = min(faithful, key=lambda r: r.latency_ms["median"])
    speedup = base.latency_ms["median"] / best.latency_ms["median"]
    return (
        f"{report.task}: fastest faithful row: {best.name} on {best.runtime}, {speedup:.2f}x "
        f"torch fp32, {metric} {best.primary():.4f} (fp32 {base.primary():.4f}), "
        f"{best.size_bytes:,} bytes"
    )


@app.command("search")
def search_cmd(
    task: TaskOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    max_params_ratio: Annotated[
        float | None, typer.Option(help="Parameter limit: a fraction (0, 1] of the task model.")
    ] = None,
    max_params: Annotated[int | None, typer.Option(help="Parameter limit (absolute).")] = None,
    max_macs_ratio: Annotated[
        float | None, typer.Option(help="MAC limit: a fraction (0, 1] of the task model.")
    ] = None,
    max_macs: Annotated[int | None, typer.Option(help="MAC limit per example (absolute).")] = None,
    generations: Annotated[int, typer.Option(help="Generations of evolution.")] = 4,
    population: Annotated[int, typer.Option(help="Population size.")] = 8,
    epochs: Annotated[int, typer.Option(help="Training epochs of each candidate.")] = 5,
    final_epochs: Annotated[int, typer.Option(help="Training epochs of the winner.")] = 30,
    workers: Annotated[int, typer.Option(help="Candidates trained in parallel processes.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the search and of every training.")] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT/search.jsonl.")
    ] = False,
) -> None:
    """Architecture search: evolve the task's search space within a size limit; write
    OUT/search.jsonl (every trial), OUT/pareto.png, OUT/front.json and the winner in OUT/model."""
    import json

    from slimkit import tasks
    from slimkit.atomic import write_text
    from slimkit.io.artifact import check_target
    from slimkit.io.save import Staging
    from slimkit.nas.stage import NasConfig, run_search, space_of, summary

    log = out / "search.jsonl"
    config = NasConfig(  # every option checked before any work
        population=population,
        generations=generations,
        epochs=epochs,
        final_epochs=final_epochs,
        workers=workers,
        seed=seed,
        max_params=max_params,
        max_macs=max_macs,
        max_params_ratio=max_params_ratio,
        max_macs_ratio=max_macs_ratio,
        log=str(log),
        resume=resume,
        plot=str(out / "pareto.png"),
    )
    the_task = tasks.get(task)
    space_of(the_task)
    if log.exists() and log.stat().st_size and not resume:
        raise TaskError(f"{log} holds an earlier search; pass --resume to continue it")
    check_target(out / "model", overwrite=resume, how="pass --resume")
    # the winner's staging directory: OUT is writable, checked before any work
    with _signals_raise(), Staging(out / "model", overwrite=True) as stage, _progress() as step:
        step(f"loading {the_task.name}")
        baseline = the_task.model()
        try:
            result = run_search(baseline, config, the_task, step)
        except (KeyboardInterrupt, Interrupted) as e:
            hint = {
                "task": task,
                "out": out,
                "max_params_ratio": max_params_ratio,
                "max_params": max_params,
                "max_macs_ratio": max_macs_ratio,
                "max_macs": max_macs,
                "generations": generations,
                "population": population,
                "epochs": epochs,
                "final_epochs": final_epochs,
                "workers": workers,
                "seed": seed,
            }
            kept = len(_log_lines(log))
            err_console.print(
                f"interrupted: {kept} finished trials kept in {log}; continue with: "
                f"slimkit search {_rerun_args(hint)} --resume",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(128 + getattr(e, "signum", signal.SIGINT)) from None
        step("saving the winner")
        stage.write(result.model)
        stage.commit()
        write_text(out / "front.json", json.dumps(result.to_json(), indent=2) + "\n")
        base_acc = the_task.evaluate(baseline)["accuracy"]
        won_acc = the_task.evaluate(result.model)["accuracy"]
    console.print(summary(result), markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"test accuracy: baseline {100 * base_acc:.2f}%, winner {100 * won_acc:.2f}% "
        f"(params {result.winner.params:,})",
        markup=False,
        highlight=False,
    )
    console.print(
        f"wrote {log}, {out / 'pareto.png'}, {out / 'front.json'}, {out / 'model'}", markup=False
    )


def _log_lines(log: Path) -> list[dict[str, object]]:
    from slimkit.nas.search import read_log

    return read_log(log)


def _rerun_args(options: dict[str, object]) -> str:
    """``--name value`` for every option given (not None), for the resume hint."""
    given = {k: v for k, v in options.items() if v is not None}
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())


def _baseline(
    model: nn.Module, task: Task, dest: Path, step: Callable[[str], None], overwrite: bool = False
) -> Candidate:
    """Save the fp32 model the same way as any artifact, and reload it from disk."""
    from slimkit.io.artifact import load, save

    step("saving the fp32 baseline")
    save(model, dest, task=task, overwrite=overwrite)
    return _candidate("fp32", load(dest), dest, None)


def _compressed(
    model: nn.Module,
    rec: Recipe,
    task: Task,
    directory: Path,
    step: Callable[[str], None],
) -> Candidate:
    """Compress, write the artifact into the empty (staging) ``directory``, and reload it
    from disk: the reloaded model is evaluated."""
    import time

    from slimkit.api import compress_run
    from slimkit.io.artifact import load
    from slimkit.io.save import io_errors, write_artifact

    start = time.perf_counter()
    run = compress_run(model, rec, task=task, progress=lambda s: step(f"{rec.name}: {s}"))
    seconds = time.perf_counter() - start
    step(f"{rec.name}: saving")
    write_artifact(run.model, directory, task=task)
    notes = [f"compressed in {seconds:.1f} s"]
    with io_errors(directory):
        for name, write in run.files().items():  # the report files the stages made
            write(directory / name)
            notes.append(f"wrote {name}")
    return _candidate(rec.name, load(directory), directory, rec.name, notes)


def _candidate(
    name: str, model: nn.Module, path: Path, recipe: str | None, notes: list[str] | None = None
) -> Candidate:
    from slimkit.evaluate.runner import Candidate

    return Candidate(name=name, model=model, artifact_dir=path, recipe=recipe, notes=notes or [])


def _evaluate(
    task: Task,
    cands: list[Candidate],
    runs: int,
    batch: int | None,
    threads: int | None,
    step: Callable[[str], None],
) -> Report:
    from slimkit.evaluate.runner import evaluate_candidates

    return evaluate_candidates(task, cands, runs=runs, batch=batch, threads=threads, progress=step)


def _runtimes(text: str) -> list[str]:
    """The runtimes of ``--runtime`` besides torch (ConfigError naming a bad one)."""
    from slimkit.deploy.runtime import RUNTIMES

    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name != "torch" and name not in RUNTIMES:
            raise ConfigError(f"--runtime {name!r}; allowed: torch, {', '.join(RUNTIMES)}")
    return [n for n in dict.fromkeys(names) if n != "torch"]


def _on_runtimes(
    task: Task,
    cands: list[Candidate],
    runtimes: list[str],
    tmp: Path,
    threads: int | None,
    step: Callable[[str], None],
) -> list[Candidate]:
    """``cands`` (torch) and each exported to ``runtimes`` (into ``tmp``)."""
    if not runtimes:
        return cands
    from slimkit.evaluate.runner import runtime_candidates

    step(f"exporting to {', '.join(runtimes)}")
    return [*cands, *runtime_candidates(task, cands, runtimes, tmp / "exports", threads)]


def _show(report: Report) -> None:
    from slimkit.report.table import render_table

    render_table(report, console)


def _write_reports(reports: list[Report], out: Path) -> None:
    from slimkit.report.write import write_report

    write_report(reports[0] if len(reports) == 1 else reports, out)


def _finish(reports: list[Report], out: Path, written: bool = False) -> None:
    """Show the reports, write them into ``out`` (unless already ``written``), say where."""
    for report in reports:
        _show(report)
    if not written:
        _write_reports(reports, out)
    console.print(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'pareto.png'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps bad input to exit 2 with one line, internal errors to exit 1."""
    try:
        result = app(args=argv, standalone_mode=False)
    except typer.Abort:
        err_console.print("aborted")
        return 1
    except typer.Exit as e:
        return int(e.exit_code)
    except typer.TyperException as e:  # usage errors: one line, exit 2
        show = getattr(e, "show", None)
        if callable(show):
            show(file=sys.stderr)
        return 2
    except SlimkitError as e:
        err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        err_console.print("interrupted")
        return 128 + int(getattr(e, "signum", signal.SIGINT))
    except Exception:
        traceback.print_exc()
        err_console.print("internal error (a bug in slimkit): please report it with the above")
        return 1
    return result if isinstance(result, int) else 0


def run() -> None:
    """Console-script wrapper around ``main``."""
    sys.exit(main())
