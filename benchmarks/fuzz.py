"""How does artifact loading stand up to mutated artifacts?

Seeded mutations (``_fuzz.py``) of the format-version-1 fixtures of ``tests/data/artifacts``:
manifest leaves, keys, module entries, sources, nesting and size; safetensors dtypes, shapes,
offsets, names, tensors and header length; bit flips in tensor data (the ``payload`` class;
all else is ``structural``); truncation, garbage, symlinks out of the artifact and pickles.
The manifest's checksum of ``model.safetensors`` is recomputed after every mutation but those
of the ``files`` entry, so the decoder behind it is what is tested. Each mutant is loaded
(``slimkit.load``) and run once on the fixture's input in a child forked from a server that
imported torch and slimkit once, under a time and an address-space limit, with an audit hook
watching for files opened outside the artifact, subprocesses and sockets.

Prints the CPU, the outcomes by class and by operator (and by manifest key), the first
examples of every bad outcome and the payload flips' counts, then the targets: no exception
but slimkit's own, no crash, hang, memory blow-up, failed first forward or escape, and no
structural mutation that loads. Writes ``benchmarks/results/fuzz.{json,md}``. Always exits 0:
it is a report.

    python benchmarks/fuzz.py --mutations 5000 --seed 0 [--workers 2] [--timeout 10]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import _fuzz
from _common import cpu_line, format_targets, markdown_table, target, write_sections

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TITLE = "Artifact loading under mutation (fuzz)"
SECTION = "fuzz"
SHOWN = ("slimkit-error", "other-exception", "forward-error", "loads-same", "loads-different",
         "crash", "hang", "memory", "escaped")  # fmt: skip


# -- tables (pure) ----------------------------------------------------------------------------
def count_rows(table: dict[str, Counter[str]], label: str) -> list[dict[str, Any]]:
    """One row per key: its outcome counts and total."""
    return [
        {"table": label, "row": key, "total": sum(c.values()), **{o: c[o] for o in SHOWN}}
        for key, c in table.items()
    ]


def outcome_table(rows: list[dict[str, Any]], label: str) -> str:
    """The rows of one count table as markdown (``label`` heads the first column)."""
    header = f"| {label} | total | " + " | ".join(SHOWN) + " |"
    body = [[r["row"], str(r["total"]), *(str(r.get(o, 0) or "") for o in SHOWN)] for r in rows]
    return markdown_table(header, body)


def example_lines(examples: dict[str, list[Any]]) -> list[str]:
    """``kind: operator [key] detail -> message`` for every listed example."""
    lines = []
    for kind, records in examples.items():
        for r in records:
            what = r["message"]
            if r["escapes"]:
                what = ", ".join(r["escapes"]) + (f" ({what})" if what else "")
            lines.append(
                f"{kind}: {r['seed']} {r['operator']} [{r['key']}] {r['detail']} -> {what[:160]}"
            )
    return lines


def render(rows: list[dict[str, Any]]) -> str:
    """The section's markdown: the count tables, then the examples."""
    parts = []
    for label, title in (("class", "class"), ("operator", "operator"), ("key", "manifest key")):
        mine = [r for r in rows if r.get("table") == label]
        if mine:
            parts.append(f"By {title}:\n\n" + outcome_table(mine, title))
    examples = [r["line"] for r in rows if r.get("table") == "example"]
    if examples:
        parts.append("First examples of each bad outcome:\n\n" + "\n".join(
            f"- `{line}`" for line in examples) + "\n")  # fmt: skip
    return "\n".join(parts)


def targets(report: _fuzz.Report) -> list[dict[str, Any]]:
    bad = _fuzz.bad_counts(report.records)
    checks = [
        ("0 exceptions at load other than SlimkitError", "other-exception"),
        ("0 crashes", "crash"),
        ("0 hangs", "hang"),
        ("0 memory blow-ups", "memory"),
        ("0 failures of the first forward", "forward-error"),
        ("0 reads or actions outside the artifact", "escaped"),
        ("0 structural mutations that load", "structural-loads"),
    ]
    return [target(text, f"{bad[k]} of {len(report.records)}", bad[k] == 0) for text, k in checks]


def section(report: _fuzz.Report, args: argparse.Namespace, cpu: str) -> dict[str, Any]:
    records = report.records
    rows = count_rows(_fuzz.counts(records, lambda r: r.klass), "class")
    rows += count_rows(_fuzz.counts(records, lambda r: r.operator), "operator")
    manifest_ops = [r for r in records if r.operator.startswith(("json", "module", "source",
                                                                  "format", "files"))]  # fmt: skip
    rows += count_rows(_fuzz.counts(manifest_ops, lambda r: r.key), "key")
    examples = {
        kind: [vars(r) for r in rs] for kind, rs in _fuzz.examples(records, args.examples).items()
    }
    rows += [{"table": "example", "line": line} for line in example_lines(examples)]
    n = max(1, len(records))
    failed_seeds = {k: v for k, v in report.seeds.items() if v["outcome"] != "loaded"}
    description = (
        f"{len(records)} mutations (seed {args.seed}) of {len(report.seeds)} fixture artifacts, "
        f"{report.workers} fork servers, {args.timeout:g} s time limit; CPU: {cpu}, "
        f"{os.cpu_count()} cores. {report.seconds:.1f} s in all ({report.startup_seconds:.1f} s "
        f"to start the servers and load the unmutated seeds; "
        f"{1000 * (report.seconds - report.startup_seconds) / n:.1f} ms a mutation). "
        f"Payload bit flips: {_fuzz.payload_summary(records)}. "
        f"No-op mutations redrawn: {sum(report.skipped.values())}. "
        f"Seeds that did not load unmutated (not mutated): {failed_seeds or 'none'}."
    )
    return {
        "title": "Outcomes",
        "description": description,
        "setup": {
            "mutations": len(records),
            "seed": args.seed,
            "workers": report.workers,
            "timeout_s": args.timeout,
            "cpu_model": cpu,
            "cpus": os.cpu_count(),
            "seconds": round(report.seconds, 2),
            "startup_seconds": round(report.startup_seconds, 2),
        },
        "payload": _fuzz.payload_summary(records),
        "bad": _fuzz.bad_counts(records),
        "examples": examples,
        "seeds": report.seeds,
        "skipped_noops": report.skipped,
        "rows": rows,
        "targets": targets(report),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--examples", type=int, default=3, help="examples per bad outcome")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    cpu = cpu_line()
    print(f"CPU: {cpu} ({os.cpu_count()} cores)", flush=True)
    report = _fuzz.fuzz(args.mutations, args.seed, workers=args.workers, timeout=args.timeout)
    result = section(report, args, cpu)
    print(result["description"] + "\n")
    print(render(result["rows"]))
    print(format_targets(result["targets"]))
    if not args.no_write:
        write_sections(RESULTS, "fuzz", TITLE, {SECTION: result}, [SECTION], {SECTION: render})
    return 0


if __name__ == "__main__":
    sys.exit(main())
