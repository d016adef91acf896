"""Reproducible artifacts: ``slimkit compress`` run twice per recipe with
``SOURCE_DATE_EPOCH=0``, the artifact files (``slimkit.json``, ``model.safetensors``) compared
byte for byte (the reports hold timings, so they differ). A recipe whose two runs differ gets
the first differing tensor named.

    python benchmarks/determinism.py [--task digits-lenet digits-mlp] [--recipe w4-gptq ...]

Writes ``benchmarks/results/determinism.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import cpu_line, markdown_table

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASKS = ("digits-lenet", "digits-mlp")
RECIPES = ("w4-gptq", "w4-gptq-per-channel", "structured-50", "deep-compression")
#: recipes made here from a shipped one with its stage options changed: the shipped w4-gptq's
#: group size 64 does not divide every layer of the digits models, per-channel groups do
VARIANTS = {"w4-gptq-per-channel": ("w4-gptq", {"granularity": "per_channel"})}
ARTIFACT_FILES = ("slimkit.json", "model.safetensors")
#: (task, recipe) pairs run besides TASKS x RECIPES by default: the shipped w4-gptq as it is,
#: on the text encoder whose layer sizes its groups of 64 divide
EXTRA = (("minilm-topics", "w4-gptq"),)


# -- comparing (pure but for reading files) ------------------------------------------------
def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def first_difference(a: Path, b: Path) -> str:
    """The first tensor (or manifest key) whose bytes differ between two artifacts."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            return f"tensor {name} only in one"
        x, y = ta[name], tb[name]
        if x.dtype != y.dtype or x.shape != y.shape or not bool((x == y).all()):
            return f"tensor {name}"
    ma, mb = (json.loads((d / "slimkit.json").read_text()) for d in (a, b))
    keys = [k for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
    return f"manifest {keys[0]}" if keys else "header bytes only"


def compare(a: Path, b: Path) -> dict[str, Any]:
    """``identical`` and each artifact file's digest in both runs."""
    files = {name: (digest(a / name), digest(b / name)) for name in ARTIFACT_FILES}
    same = all(x == y for x, y in files.values())
    row: dict[str, Any] = {"identical": same, "files": files}
    if not same:
        row["difference"] = first_difference(a, b)
    return row


# -- running ---------------------------------------------------------------------------------
def compress(task: str, recipe: str, out: Path, epoch: str = "0") -> tuple[int, str]:
    """Run ``slimkit compress`` in a fresh process; (exit code, last line of output)."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": epoch}
    cmd = [sys.executable, "-m", "slimkit", "compress", "--task", task, "--recipe", recipe]
    cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def recipe_file(name: str, work: Path) -> str:
    """A shipped recipe's name, or the path of a variant's YAML written into ``work``."""
    if name not in VARIANTS:
        return name
    import yaml
    from _common import shipped_recipe

    base, options = VARIANTS[name]
    recipe = shipped_recipe(base)
    recipe["name"] = name
    (stage,) = recipe["stages"]
    kind = next(iter(stage))
    stage[kind] = {k: v for k, v in stage[kind].items() if k != "group_size"} | options
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run_recipe(task: str, recipe: str, work: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task, "recipe": recipe}
    outs = [work / f"{task}-{recipe}-{i}" for i in (1, 2)]
    for out in outs:
        code, last = compress(task, recipe_file(recipe, work), out)
        if code != 0:
            row["error"] = f"exit {code}: {last}"
            return row
    row.update(compare(*outs))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    header = "| task | recipe | identical | model.safetensors sha256 | slimkit.json sha256 | note |"
    body = []
    for r in rows:
        files = r.get("files", {})
        cells = [r["task"], r["recipe"], {True: "yes", False: "NO"}.get(r.get("identical"), "-")]
        for name in ARTIFACT_FILES[::-1]:
            pair = files.get(name)
            cells.append("-" if pair is None else " / ".join(dict.fromkeys(pair)))
        cells.append(r.get("error") or r.get("difference", ""))
        body.append(cells)
    return markdown_table(header, body)


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", default=None)
    parser.add_argument("--recipe", nargs="+", default=list(RECIPES))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    pairs = [(t, r) for t in args.task or TASKS for r in args.recipe]
    pairs += list(EXTRA) if args.task is None else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="determinism-") as tmp:
        for task, recipe in pairs:
            rows.append(run_recipe(task, recipe, Path(tmp)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = (
        "# Reproducible artifacts\n\nEach recipe compressed twice (fresh processes, "
        f"SOURCE_DATE_EPOCH=0); the artifact files compared byte for byte. CPU: {cpu_line()}."
        "\n\n" + table(rows)
    )
    print("\n" + text, flush=True)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        write_text(RESULTS / "determinism.json", json.dumps({"rows": rows}, indent=2) + "\n")
        write_text(RESULTS / "determinism.md", text)
    return rows


if __name__ == "__main__":
    run()
