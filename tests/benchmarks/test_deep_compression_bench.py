"""benchmarks/deep_compression.py's pure parts: stages, comparisons, table, targets."""

from __future__ import annotations

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("deep_compression.py")


def test_stages_are_the_shipped_recipe_with_the_variant_sparsity(bench):
    shipped = bench.stages_of(None)
    assert [s.kind for s in shipped] == ["prune", "finetune", "quantize", "encode"]
    assert shipped[0].sparsity == 0.95
    ninety = bench.stages_of(0.9)
    assert ninety[0].sparsity == 0.9 and ninety[1:] == shipped[1:]


def _rows():
    return [
        {
            "task": "digits-mlp",
            "variant": "-",
            "stage": "fp32",
            "model_bytes": 200_000,
            "accuracy": 0.99,
        },
        {
            "task": "digits-mlp",
            "variant": "deep-compression",
            "stage": "prune: gradual 0.95",
            "model_bytes": 20_000,
            "accuracy": 0.985,
        },
        {
            "task": "digits-mlp",
            "variant": "deep-compression",
            "stage": "encode: huffman",
            "model_bytes": 4_000,
            "accuracy": 0.984,
        },
    ]


def test_ratio_and_drop_against_the_task_fp32(bench):
    rows = _rows()
    bench.add_comparisons(rows)
    assert rows[1]["ratio"] == pytest.approx(10.0)
    assert rows[2]["ratio"] == pytest.approx(50.0)
    assert rows[2]["drop"] == pytest.approx(0.6)


def test_targets_judge_the_final_stage(bench):
    rows = _rows()
    bench.add_comparisons(rows)
    checks = bench.targets(rows)
    assert [c["met"] for c in checks] == [True, False]  # 50x met, drop 0.6 > 0.5
    assert checks[0]["figure"] == "50.0x"
    text = bench.format_targets(checks)
    assert "accuracy drop <= 0.5 points: NOT met (+0.60 points)" in text
    assert "| digits-mlp | deep-compression | encode: huffman | 4,000 | 50.0x |" in bench.table(
        rows
    )
