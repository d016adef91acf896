"""benchmarks/quant_minilm.py's pure parts: rows, the markdown table, the targets."""

from __future__ import annotations

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("quant_minilm.py")


SETUP = {
    "task": "minilm-topics",
    "batch": 64,
    "seq_len": 128,
    "threads": 2,
    "runs": 10,
    "warmup": 2,
    "budget_seconds": 150.0,
    "torch": "2.13.0",
    "cpu_model": "Some CPU",
    "cpu_flags": {"avx2": True, "avx512f": False, "avx512_vnni": True},
    "gemm": {"shape": "4096x384 @ 384x1536", "int_mm_ms": 5000.0, "fp32_mm_ms": 100.0},
}


def make(bench, name, cos=0.99, knn=0.42, speedup=1.0, size=100, quant=1.0, sim=False):
    return bench.row(
        name,
        f"method {name}",
        metrics={"cosine_mean": cos, "cosine_min": cos - 0.01, "knn_accuracy": knn},
        latency_ms=100.0 / speedup,
        fp32_latency_ms=100.0,
        size_bytes=size,
        fp32_size_bytes=1000,
        quant_seconds=quant,
        simulated=sim,
        runs=10,
    )


def all_met(bench):
    return [
        make(bench, "fp32", cos=1.0, knn=0.42, size=1000),
        make(bench, "w8a8", cos=0.998, knn=0.416, speedup=2.6, size=260),
        make(bench, "w4-rtn", cos=0.97, size=150),
        make(bench, "w4-gptq", cos=0.986, size=190, quant=50.0),
        make(bench, "w4-awq", cos=0.984, size=190, quant=30.0),
        make(bench, "w5-gptq", cos=0.995, size=200, quant=60.0),
        make(bench, "w3-gptq", cos=0.96, size=130),
        make(bench, "mixed-4.5bit", cos=0.99, size=180),
    ]


def status(checks, start):
    return [c["met"] for c in checks if c["target"].startswith(start)]


def replace(rows, name, **fields):
    return [{**r, **fields} if r["name"] == name else r for r in rows]


def test_row_derives_speedup_and_size_ratio(bench):
    r = bench.row(
        "x", "m", latency_ms=40.0, fp32_latency_ms=100.0, size_bytes=25, fp32_size_bytes=100
    )
    assert r["speedup"] == pytest.approx(2.5) and r["size_ratio"] == pytest.approx(0.25)
    assert r["cosine_mean"] is None and r["error"] is None
    failed = bench.row("y", "m", error="RecipeError: not found", fp32_size_bytes=100)
    assert failed["speedup"] is None and failed["size_ratio"] is None
    assert failed["error"] == "RecipeError: not found"


def test_markdown_shows_figures_gaps_and_errors(bench):
    rows = [
        make(bench, "fp32", cos=1.0, size=1000),
        make(bench, "w8a8", cos=0.99812, speedup=2.0, size=250, quant=3.25),
        bench.row("w4-awq", "slimkit w4-awq", error="KeyError: a|b", note="n"),
    ]
    text = bench.markdown(rows, SETUP)
    lines = text.splitlines()
    w8a8 = next(line for line in lines if line.startswith("| w8a8 |"))
    assert "| 2.00x | 10 | 0.99812 | 0.98812 | 0.4200 | 250 | 0.250x | 3.2 | no |" in w8a8
    awq = next(line for line in lines if line.startswith("| w4-awq |"))
    assert awq.count("| - ") >= 9 and "n; error: KeyError: a/b |" in awq
    assert len(awq.split("|")) == len(w8a8.split("|"))  # the pipe in the error is escaped
    assert "batch 64 x 128 tokens, 2 threads" in text
    assert "flags: avx2, avx512_vnni." in text and "avx512f" not in text
    assert "torch._int_mm int8 GEMM 4096x384 @ 384x1536 5000 ms, fp32 matmul 100 ms" in text


def test_targets_all_met(bench):
    checks = bench.targets(all_met(bench))
    assert len(checks) == 8
    assert all(c["met"] is True for c in checks), [c for c in checks if not c["met"]]
    text = bench.format_targets(checks)
    assert text.count(": met (") == 8 and "NOT met" not in text
    assert "w8a8 speedup >= 2.5x: met (w8a8: 2.60x)" in text


def test_each_w8a8_target_fails_on_its_own_figure(bench):
    rows = all_met(bench)
    slow = bench.targets(replace(rows, "w8a8", speedup=2.4))
    assert status(slow, "w8a8 speedup") == [False]
    assert status(slow, "w8a8 cosine") == [True]
    knn = bench.targets(replace(rows, "w8a8", knn_accuracy=0.414))  # 0.6 points below
    assert status(knn, "w8a8 1-NN") == [False]
    (check,) = [c for c in knn if c["target"].startswith("w8a8 1-NN")]
    assert check["figure"] == "w8a8: 1-NN 0.4140 vs fp32 0.4200, drop +0.60 points"
    assert status(bench.targets(replace(rows, "w8a8", knn_accuracy=0.45)), "w8a8 1-NN") == [True]
    assert status(bench.targets(replace(rows, "w8a8", simulated=True)), "w8a8 not") == [False]
    assert status(bench.targets(replace(rows, "w8a8", cosine_mean=0.9969)), "w8a8 cos") == [False]


def test_w4_target_needs_one_row_meeting_all_three(bench):
    rows = all_met(bench)
    # gptq is too big, awq too inaccurate: neither meets all three
    mixed_up = replace(rows, "w4-gptq", size_ratio=0.21)
    assert status(bench.targets(mixed_up), "4-bit g64") == [False]
    slow = replace(rows, "w4-gptq", quant_seconds=120.0)
    assert status(bench.targets(slow), "4-bit g64") == [False]
    awq_good = replace(slow, "w4-awq", cosine_mean=0.99)
    assert status(bench.targets(awq_good), "4-bit g64") == [True]


def test_mixed_targets_compare_with_best_w4_and_w5(bench):
    rows = all_met(bench)
    worse = replace(rows, "mixed-4.5bit", cosine_mean=0.9855)  # below w4-gptq's 0.986
    assert status(bench.targets(worse), "mixed-4.5bit cosine") == [False]
    bigger = replace(rows, "mixed-4.5bit", size_bytes=201)
    assert status(bench.targets(bigger), "mixed-4.5bit size") == [False]
    no_w5 = [r for r in rows if r["name"] != "w5-gptq"]
    assert status(bench.targets(no_w5), "mixed-4.5bit size") == [False]
    assert status(bench.targets(rows), "w3-gptq") == [True]
    assert status(bench.targets(replace(rows, "w3-gptq", cosine_mean=0.94)), "w3-gptq") == [False]


def test_failed_rows_are_not_met_and_absent_rows_not_measured(bench):
    failed = [
        make(bench, "fp32", cos=1.0),
        bench.row("w8a8", "slimkit w8a8", error="RecipeError: recipe file not found"),
    ]
    checks = bench.targets(failed)
    assert status(checks, "w8a8") == [False, False, False, False]
    assert status(checks, "w3-gptq") == [None]
    text = bench.format_targets(checks)
    assert "w8a8 cosine mean >= 0.997: NOT met (no result)" in text
    assert "w3-gptq cosine mean >= 0.95: not measured (no result)" in text


def test_with_options_changes_only_quantize_stages(bench):
    recipe = {
        "name": "w4-gptq",
        "stages": [
            {"prune": {"method": "magnitude", "sparsity": 0.5}},
            {"quantize": {"method": "gptq", "bits": 4, "group_size": 64}},
        ],
    }
    w5 = bench.with_options(recipe, {"bits": 5}, "w5-gptq")
    assert w5["name"] == "w5-gptq"
    assert w5["stages"][1]["quantize"] == {"method": "gptq", "bits": 5, "group_size": 64}
    assert w5["stages"][0] == recipe["stages"][0]
    assert recipe["stages"][1]["quantize"]["bits"] == 4  # the input is not modified


def test_cpu_info_reads_model_and_int8_bf16_flags(bench):
    text = (
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    model, flags = bench.cpu_info(text)
    assert model == "AMD EPYC 9R14"
    assert flags == {
        "avx2": True,
        "avx512f": True,
        "avx512_vnni": True,
        "avx_vnni": False,
        "avx512_bf16": False,
        "amx_int8": False,
        "amx_bf16": False,
    }
    assert bench.cpu_info("") == ("unknown", dict.fromkeys(flags, False))


def test_plan_runs_and_extrapolate(bench):
    assert bench.plan_runs(round_seconds=4.0, budget_seconds=150.0, max_runs=10) == 10
    assert bench.plan_runs(round_seconds=20.0, budget_seconds=150.0, max_runs=10) == 5
    assert bench.plan_runs(round_seconds=200.0, budget_seconds=150.0, max_runs=10) == 3
    assert bench.plan_runs(round_seconds=200.0, budget_seconds=150.0, max_runs=2) == 2
    # 1000 ms fixed + 100 ms per example
    assert bench.extrapolate((4, 12), (1400.0, 2200.0), 64) == pytest.approx(7400.0)
    assert bench.extrapolate((4, 12), (3000.0, 2000.0), 64) == pytest.approx(2000.0)


def test_selected_keeps_order_and_rejects_unknown_names(bench):
    names = ["w8-rtn", "w4-gptq", "onnxruntime"]
    assert bench.selected(names, None) == names
    assert bench.selected(names, ["onnxruntime", "w8-rtn"]) == ["w8-rtn", "onnxruntime"]
    with pytest.raises(SystemExit, match="unknown row name"):
        bench.selected(names, ["w9"])


def test_variants_follow_their_shipped_recipe(bench):
    names = bench.slimkit_names()
    assert names[names.index("w8a8") + 1 : names.index("w8a8") + 3] == [
        "w8a8-exact",
        "w8a8-nosq",
    ]
    assert names[names.index("w4-gptq") + 1] == "w5-gptq"
    (exact,) = bench.load_recipe("w8a8-exact").stages
    assert (exact.kernel, exact.smoothquant, exact.alpha) == ("reference", True, 0.3)
    (nosq,) = bench.load_recipe("w8a8-nosq").stages
    assert (nosq.kernel, nosq.smoothquant) == ("auto", False)


def test_rerender_rewrites_table_and_targets_from_saved_rows(bench, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    saved = {"setup": SETUP, "rows": all_met(bench), "targets": []}
    (tmp_path / "quant_minilm.json").write_text(json.dumps(saved))
    bench.run(["--rerender"])
    result = json.loads((tmp_path / "quant_minilm.json").read_text())
    assert result["rows"] == saved["rows"]
    assert {c["met"] for c in result["targets"]} == {True}
    text = (tmp_path / "quant_minilm.md").read_text()
    assert "| w8a8 |" in text and "w8a8 speedup >= 2.5x: met" in text


def test_merge_keeps_saved_rows_and_replaces_remeasured_ones(bench):
    saved = [make(bench, "fp32", cos=1.0), make(bench, "w8a8", cos=0.99), make(bench, "x")]
    new = [make(bench, "fp32", cos=1.0, speedup=0.5), make(bench, "w8a8-static", cos=0.98)]
    new.append(make(bench, "w8a8", cos=0.995))
    merged = bench.merge_rows(saved, new, ["fp32", "w8a8", "w8a8-static"])
    assert [r["name"] for r in merged] == ["fp32", "w8a8", "w8a8-static", "x"]
    assert merged[0] is saved[0]  # the saved fp32 row stays
    assert merged[1]["cosine_mean"] == 0.995


def test_kmeans_row_runs_without_fine_tuning(bench):
    names = bench.slimkit_names()
    assert names.count("kmeans-4bit-noft") == 1 and "w8a8-static" in names
    (stage,) = bench.load_recipe("kmeans-4bit-noft").stages
    assert stage.finetune_epochs == 0 and stage.bits == 4
