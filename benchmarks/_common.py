"""What the benchmark scripts share: number formatting, targets, rows, sections, round trips.

Imported by the scripts of this directory as ``from _common import ...`` (a script run as
``python benchmarks/x.py`` has this directory on its path; the tests add it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimkit.atomic import write_text

Row = dict[str, Any]
Table = Callable[[list[Row]], str]


# -- numbers (pure) ---------------------------------------------------------------------------
def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``, or ``-`` for a missing value."""
    return "-" if value is None else format(value, spec)


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals (``0.9911`` -> ``99.11``)."""
    return fmt(None if value is None else 100 * value, ".2f")


def ratio(value: float | None) -> str:
    """``2.50x``, or ``-``."""
    return "-" if value is None else f"{value:.2f}x"


def drop_points(base: Row, r: Row) -> float | None:
    """Accuracy points lost against ``base`` (negative: gained); None when either is missing."""
    if base.get("accuracy") is None or r.get("accuracy") is None:
        return None
    return 100.0 * (base["accuracy"] - r["accuracy"])


# -- rows and targets (pure) ------------------------------------------------------------------
def row_named(rows: Sequence[Row], name: str) -> Row:
    """The row called ``name`` without an error; {} when there is none."""
    for r in rows:
        if r.get("row") == name and not r.get("error"):
            return r
    return {}


def target(text: str, figure: str, met: bool | None) -> Row:
    """One target: what is asked, the measured figure, met (None: not measured)."""
    return {"target": text, "figure": figure, "met": met}


def format_targets(checks: Sequence[Row]) -> str:
    status = {True: "met", False: "NOT met", None: "not measured"}
    lines = [f"- {c['target']}: {status[c['met']]} ({c['figure']})" for c in checks]
    return "Targets:\n" + "\n".join(lines) + "\n"


def error_line(e: BaseException) -> str:
    """``Type: first line of the message``: how a failed row is reported."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# -- sections of a results file (pure) ------------------------------------------------------
def merge_sections(saved: Row, new: Row, order: Sequence[str]) -> Row:
    """Saved results with the sections in ``new`` replaced, in ``order``."""
    sections = {**saved.get("sections", {}), **new}
    return {"sections": {s: sections[s] for s in order if s in sections}}


def render_sections(title: str, results: Row, tables: dict[str, Table]) -> str:
    """The markdown of every section: title, description, table, targets."""
    parts = [f"# {title}\n"]
    for name, section in results["sections"].items():
        parts.append(
            f"## {section.get('title', name)}\n\n{section.get('description', '')}\n\n"
            + tables[name](section["rows"])
            + "\n"
            + format_targets(section["targets"])
        )
    return "\n".join(parts)


def write_sections(results_dir: Path, stem: str, title: str, new: Row, order: Sequence[str],
                   tables: dict[str, Table]) -> Row:  # fmt: skip
    """Merge ``new`` sections into ``results_dir/stem.json`` and rewrite ``stem.md``."""
    path = results_dir / f"{stem}.json"
    saved = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    results = merge_sections(saved, new, order)
    write_text(path, json.dumps(results, indent=2) + "\n")
    write_text(results_dir / f"{stem}.md", render_sections(title, results, tables))
    return results


# -- models -----------------------------------------------------------------------------------
def shipped_recipe(name: str) -> Row:
    """A shipped recipe as a dict (to run it with a stage option changed)."""
    from slimkit.recipe import Recipe, resolve

    return Recipe.from_file(resolve(name)).to_dict()


def round_trip(model: Any, path: Path) -> Any:
    """Save ``model`` as an artifact at ``path``, load it back, delete the files."""
    import slimkit

    saved = slimkit.save(model, path, overwrite=True)
    loaded = slimkit.load(saved)
    shutil.rmtree(saved)
    return loaded


def artifact_bytes(model: Any, path: Path) -> tuple[Any, int]:
    """Save ``model`` at ``path``; (the model loaded back, bytes of ``model.safetensors``)."""
    import slimkit

    saved = slimkit.save(model, path, overwrite=True)
    size = (Path(saved) / "model.safetensors").stat().st_size
    loaded = slimkit.load(saved)
    shutil.rmtree(saved)
    return loaded, size


# -- markdown tables (pure) -------------------------------------------------------------------
def markdown_table(header: str, body: Sequence[Sequence[str]]) -> str:
    """``header`` (``| a | b |``), its ``|---|---|`` rule and one line per row of cells."""
    rule = "|" + "---|" * (header.count("|") - 1)
    lines = [header, rule, *("| " + " | ".join(cells) + " |" for cells in body)]
    return "\n".join(lines) + "\n"


# -- timing -----------------------------------------------------------------------------------
def time_rows(
    timed: Sequence[tuple[Row, Any]], inputs: Any, runs: int, warmup: int, threads: int
) -> float:
    """Time the models of ``timed`` alternately in one process (``time_alternating``) and
    put each one's median (``latency_ms``) and summary (``latency``) into its row; returns
    the highest 1-minute load average seen, to report beside the figures."""
    import os

    from slimkit.evaluate.latency import time_alternating

    load_before = os.getloadavg()[0]
    latency = time_alternating([m for _, m in timed], inputs, runs, warmup, threads)
    for (row, _), lat in zip(timed, latency, strict=True):
        row["latency_ms"], row["latency"] = lat["median"], lat
    return max(load_before, os.getloadavg()[0])


# -- the machine ------------------------------------------------------------------------------
#: the instruction sets that decide which int8 and bf16 kernels are fast
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_info(cpuinfo: str) -> tuple[str, dict[str, bool]]:
    """(CPU model name, presence of each of CPU_FLAGS) from /proc/cpuinfo text."""
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, {f: f in flags for f in CPU_FLAGS}


def cpu_model(cpuinfo: str) -> str:
    """The ``model name`` of /proc/cpuinfo text, or ``unknown``."""
    return cpu_info(cpuinfo)[0]


def cpu_line(cpuinfo: str | None = None) -> str:
    """``MODEL (int8/bf16 instruction sets: ...)`` of this machine (or of ``cpuinfo``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = cpu_info(cpuinfo)
    found = ", ".join(f for f, present in flags.items() if present) or "none of " + ", ".join(
        CPU_FLAGS
    )
    return f"{model} (int8/bf16 instruction sets: {found})"
