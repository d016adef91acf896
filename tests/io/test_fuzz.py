"""Mutated artifacts: a few hundred seeded mutations of the fixtures must each be refused with
a SlimkitError (or, for bit flips inside tensor data, load), never crash, hang, blow up
memory, reach outside the artifact or load a structurally wrong artifact.

The harness itself (``benchmarks/_fuzz.py``) is tested first, with fake loaders
(``fuzz_fakes.py``), so those tests do not depend on slimkit's loader.
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from tests.benchmarks.conftest import load_script

FAKES = Path(__file__).resolve().parent / "fuzz_fakes.py"
MUTATIONS = 300


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    return load_script("_fuzz.py")


@pytest.fixture(scope="module")
def seeds(fuzz: ModuleType) -> list[Any]:
    return fuzz.fixture_seeds()


def _written(fuzz: ModuleType, mutant: Any, seed: Any, where: Path) -> dict[str, bytes]:
    """Every file of the written artifact (a symlink as its target path, a folder as DIR)."""
    art = mutant.write(where, seed)
    out = {}
    for f in sorted(art.iterdir()):
        if f.is_symlink():
            out[f.name] = b"-> " + str(f.readlink()).encode()
        elif f.is_dir():
            out[f.name] = b"DIR"
        else:
            out[f.name] = f.read_bytes()
    return out


def _seed_files(seed: Any) -> dict[str, bytes]:
    return {
        f.name: f.read_bytes()
        for f in sorted(seed.path.iterdir())
        if f.name != "expected.safetensors"
    }


# -- mutation operators (pure) ---------------------------------------------------------------
def test_every_operator_changes_the_files(
    fuzz: ModuleType, seeds: list[Any], tmp_path: Path
) -> None:
    for name in fuzz.OPERATORS:
        made = 0
        for k in range(12):
            seed = seeds[k % len(seeds)]
            mutant = fuzz.apply(seed, random.Random(f"{name}:{k}"), name)
            if mutant is None:
                continue
            made += 1
            files = _written(fuzz, mutant, seed, tmp_path / f"{name}-{k}")
            assert files != _seed_files(seed), (name, mutant.detail)
            assert mutant.operator.startswith(name.split("-")[0])
            assert mutant.klass == ("payload" if name == "payload-flip" else "structural")
        assert made >= 6, f"{name} applied only {made} times in 12"


def test_checksum_is_recomputed_after_a_header_mutation(
    fuzz: ModuleType, seeds: list[Any], tmp_path: Path
) -> None:
    seed = seeds[0]
    mutant = fuzz.apply(seed, random.Random(1), "st-dtype")
    files = _written(fuzz, mutant, seed, tmp_path / "m")
    entry = json.loads(files["slimkit.json"])["files"]["model.safetensors"]
    assert files["model.safetensors"] != seed.weights
    assert entry["sha256"] == fuzz.sha256(files["model.safetensors"])
    assert entry["bytes"] == len(files["model.safetensors"])


def test_checksum_is_kept_when_the_files_entry_is_the_target(
    fuzz: ModuleType, seeds: list[Any]
) -> None:
    seed = seeds[0]
    draft = fuzz.Draft(seed, json.loads(seed.manifest_text), seed.weights)
    draft.manifest["files"]["model.safetensors"]["sha256"] = "0" * 64
    mutant = draft.mutant("json-leaf", "files", "sha256 zeroed", checksum=False)
    entry = json.loads(mutant.manifest_data())["files"]["model.safetensors"]
    assert entry["sha256"] == "0" * 64
    # the same change with the checksum recomputed is no change at all
    recomputed = draft.mutant("json-leaf", "files", "sha256 zeroed")
    assert recomputed.same_as(seed)


def test_a_payload_flip_changes_1_to_8_bits_inside_one_tensor(
    fuzz: ModuleType, seeds: list[Any]
) -> None:
    for k, seed in enumerate(seeds):
        mutant = fuzz.apply(seed, random.Random(k), "payload-flip")
        old, new = seed.weights, mutant.weights
        assert len(old) == len(new)
        diff = [i for i in range(len(old)) if old[i] != new[i]]
        bits = sum(bin(old[i] ^ new[i]).count("1") for i in diff)
        assert 1 <= bits <= 8
        header, payload = fuzz.split_safetensors(old)
        start = len(old) - len(payload)
        name = mutant.detail.split(":")[0]
        begin, end = header[name]["data_offsets"]
        assert all(start + begin <= i < start + end for i in diff), mutant.detail
        assert mutant.klass == "payload" and mutant.key == "data"


def test_deep_nesting_and_huge_integers_reach_the_file(fuzz: ModuleType, seeds: list[Any]) -> None:
    seed = seeds[0]
    draft = fuzz.Draft(seed, json.loads(seed.manifest_text), seed.weights)
    draft.manifest["recipe"] = "@A@"
    draft.manifest["simulated"] = "@B@"
    raw = {"@A@": "[" * 100_000 + "]" * 100_000, "@B@": "9" * 5000}
    text = draft.mutant("json-deep", "recipe", "deep", raw=raw).manifest_data().decode()
    assert "[" * 100_000 in text and "9" * 5000 in text
    with pytest.raises(RecursionError):
        json.loads(text)


def test_no_op_mutations_are_detected(fuzz: ModuleType, seeds: list[Any]) -> None:
    seed = seeds[1]
    draft = fuzz.Draft(seed, json.loads(seed.manifest_text), seed.weights)
    assert draft.mutant("none", "-", "nothing").same_as(seed)
    draft.manifest["format_version"] = 1.0  # equal in Python, not the same JSON
    assert not draft.mutant("format-version", "format_version", "1.0").same_as(seed)


def test_join_safetensors_round_trips(fuzz: ModuleType, seeds: list[Any]) -> None:
    for seed in seeds[:5]:
        header, payload = fuzz.split_safetensors(seed.weights)
        again = fuzz.join_safetensors(header, payload)
        (n,) = struct.unpack("<Q", again[:8])
        assert n % 8 == 0
        a, b = st_load(seed.weights), st_load(again)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mutations_are_reproducible_from_the_seed(fuzz: ModuleType, seeds: list[Any]) -> None:
    first = [fuzz.mutant_at(seeds, i, 7) for i in range(40)]
    again = [fuzz.mutant_at(seeds, i, 7) for i in range(40)]
    other = [fuzz.mutant_at(seeds, i, 8) for i in range(40)]
    key = [(m.operator, m.detail, m.manifest_data(), m.weights) for m in first]
    assert key == [(m.operator, m.detail, m.manifest_data(), m.weights) for m in again]
    assert key != [(m.operator, m.detail, m.manifest_data(), m.weights) for m in other]
    assert {m.seed for m in first} == {s.name for s in seeds}  # seeds in turn


# -- the runner, with fake loaders -----------------------------------------------------------
@pytest.fixture(scope="module")
def fake_runner(fuzz: ModuleType) -> Any:
    runner = fuzz.Runner(loader=f"{FAKES}:by_name", workers=1, timeout=2.0)
    yield runner
    runner.close()


def _case(root: Path, name: str) -> tuple[Path, Path]:
    art = root / name
    art.mkdir(parents=True)
    (art / "slimkit.json").write_text("{}")
    inputs = root / "input.safetensors"
    if not inputs.exists():
        save_file({"input": torch.arange(6.0).reshape(2, 3)}, str(inputs))
    return art, inputs


@pytest.mark.parametrize(
    ("name", "outcome"),
    [
        ("identity", "loaded"),
        ("reads-inside", "loaded"),
        ("abort", "crash"),
        ("segfault", "crash"),
        ("silent-exit", "crash"),
        ("sleep", "hang"),
        ("bytearray", "memory"),
        ("torch-alloc", "memory"),
        ("reads-outside", "escaped"),
        ("system", "escaped"),
        ("imports-pdb", "escaped"),
        ("refuses", "slimkit-error"),
        ("key-error", "other-exception"),
        ("exits", "other-exception"),
        ("bad-forward", "forward-error"),
    ],
)
def test_runner_classifies_each_outcome(
    fake_runner: Any, tmp_path: Path, name: str, outcome: str
) -> None:
    art, inputs = _case(tmp_path, name)
    started = time.monotonic()
    result = fake_runner.load(art, inputs)
    assert result["outcome"] == outcome, result
    assert time.monotonic() - started < 8  # a hang is cut at the 2 s limit
    if outcome == "escaped":
        assert result["escapes"]
    if outcome == "slimkit-error":
        assert result["message"].startswith("ArtifactError: refused")


def test_runner_compares_outputs_with_the_reference(fake_runner: Any, tmp_path: Path) -> None:
    results = {
        name: fake_runner.load(*_case(tmp_path, name)) for name in ("identity", "shifted", "nan")
    }
    fake_runner.references["seed"] = results["identity"]
    assert fake_runner.classify(results["identity"], "seed") == "loads-same"
    assert fake_runner.classify(results["shifted"], "seed") == "loads-different"
    assert results["nan"]["finite"] is False
    assert fake_runner.classify(results["nan"], "seed") == "loads-different"


def test_summaries_count_what_is_bad(fuzz: ModuleType) -> None:
    records = [
        fuzz.Record(0, "s", "json-leaf", "structural", "source", "d", "slimkit-error"),
        fuzz.Record(1, "s", "payload-flip", "payload", "data", "d", "loads-different"),
        fuzz.Record(2, "s", "st-dtype", "structural", "header", "d", "loads-different"),
        fuzz.Record(3, "s", "source", "structural", "source", "d", "crash"),
    ]
    assert [fuzz.is_bad(r) for r in records] == [False, False, True, True]
    bad = fuzz.bad_counts(records)
    assert bad["crash"] == 1 and bad["structural-loads"] == 1 and bad["hang"] == 0
    assert fuzz.payload_summary(records)["changed_outputs"] == 1
    assert set(fuzz.examples(records)) == {"structural loads-different", "crash"}


# -- the fuzz run against slimkit's loader ---------------------------------------------------
def test_mutated_artifacts_are_refused_cleanly(fuzz: ModuleType, seeds: list[Any]) -> None:
    started = time.perf_counter()
    report = fuzz.fuzz(MUTATIONS, seed=0, seeds=seeds, workers=2, timeout=10.0)
    elapsed = time.perf_counter() - started
    assert {k: v["outcome"] for k, v in report.seeds.items()} == {s.name: "loaded" for s in seeds}
    records = report.records
    assert len(records) == MUTATIONS
    assert {r.seed for r in records} == {s.name for s in seeds}
    assert {r.klass for r in records} == {"payload", "structural"}
    bad = [r for r in records if fuzz.is_bad(r) and r.outcome != "loads-same"]
    lines = [
        f"{r.outcome}: {r.seed} {r.operator} [{r.key}] {r.detail} -> {r.message[:120]} {r.escapes}"
        for r in bad
    ]
    assert not lines, f"{len(lines)} bad outcomes:\n" + "\n".join(lines[:40])
    assert elapsed < 90, elapsed
