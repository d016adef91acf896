"""Crash safety: saves killed with SIGKILL at random moments leave the old artifact or the new
one, whole, and the next save leaves no scratch directory (benchmarks/crash.py at tiny size),
and the script's pure parts."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

import slimkit
from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def crash() -> ModuleType:
    return load_script("crash.py")


def test_killed_saves_leave_a_whole_artifact(crash: ModuleType, tmp_path: Path) -> None:
    rows = crash.run_saves(tmp_path, kills=3, mb=2.0, rng=random.Random(1))
    assert [r["mode"] for r in rows] == ["save (exchange)", "save (two-rename fallback)"]
    for row in rows:
        assert row["old whole"] + row["new whole"] == 3
        assert row["broken"] == 0
        assert row["stray_after_next"] == 0
    assert sum(r["killed"] for r in rows) >= 1  # at least one kill landed mid-save
    assert crash.stray(tmp_path / "out") == []


def test_classify_tells_old_new_and_broken(crash: ModuleType, tmp_path: Path) -> None:
    a, b = crash.build_model(0.1, 1), crash.build_model(0.1, 2)
    old, new = slimkit.save(a, tmp_path / "old"), slimkit.save(b, tmp_path / "new")
    target = slimkit.save(b, tmp_path / "t")

    def arch() -> object:
        return crash.build_model(0.1, 0)

    assert crash.classify(target, old, new, arch) == "new whole"
    assert crash.classify(target, new, old, arch) == "old whole"
    (target / "slimkit.json").write_text((old / "slimkit.json").read_text())  # a mix
    assert crash.classify(target, old, new, arch) == "broken"
    assert crash.classify(tmp_path / "missing", old, new, arch) == "broken"


def test_report_matches_needs_the_same_recipe(crash: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "slimkit.json").write_text('{"recipe": {"name": "w8-rtn"}}')
    (tmp_path / "report.json").write_text('{"results": [{}, {"recipe": "w8-rtn"}]}')
    assert crash.report_matches(tmp_path)
    (tmp_path / "report.json").write_text('{"results": [{}, {"recipe": "prune"}]}')
    assert not crash.report_matches(tmp_path)
    (tmp_path / "report.json").unlink()
    assert not crash.report_matches(tmp_path)


def test_table_and_verdict(crash: ModuleType) -> None:
    counts = Counter({"old whole": 12, "new whole": 8})
    rows = [crash._row("save (exchange)", 20, 15, counts, 0, 0.123)]
    lines = crash.table(rows).splitlines()
    assert lines[2] == "| save (exchange) | 20 | 15 | 12 | 8 | 0 | 0 | 0.12 |"
    assert crash.passed(rows)
    assert "every kill left a whole artifact" in crash.render(rows, "cpu")
    rows.append(crash._row("compress", 2, 2, Counter({"broken": 1, "old whole": 1}), 0, 5.0))
    assert not crash.passed(rows)
    assert "SOME KILLS BROKE THINGS" in crash.render(rows, "cpu")


def test_cpu_model(crash: ModuleType) -> None:
    text = "processor : 0\nmodel name\t: Some CPU @ 2GHz\nflags\t: fpu avx2 amx_bf16\n"
    assert crash.cpu_line(text) == "Some CPU @ 2GHz (int8/bf16 instruction sets: avx2, amx_bf16)"
    assert crash.cpu_line("").startswith("unknown (int8/bf16 instruction sets: none of avx2")
