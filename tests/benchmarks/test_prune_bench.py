"""benchmarks/prune.py's pure parts: the rows, the table, the targets."""

from __future__ import annotations

import pytest

from slimkit.recipe import Recipe
from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("prune.py")


def test_every_row_is_a_valid_prune_stage(bench):
    import slimkit.prune.nm
    import slimkit.prune.sparsegpt
    import slimkit.prune.unstructured  # noqa: F401

    for name, options in bench.ROWS.items():
        (stage,) = Recipe.from_dict({"name": name, "stages": [{"prune": dict(options)}]}).stages
        assert stage.method == options["method"]


def test_targets_compare_sparsegpt_with_magnitude(bench):
    rows = [
        {"row": "magnitude-50", "cosine_mean": 0.90},
        {"row": "sparsegpt-50", "cosine_mean": 0.95},
        {"row": "magnitude-2:4", "cosine_mean": 0.80},
        {"row": "sparsegpt-2:4", "cosine_mean": 0.79},
    ]
    checks = bench.targets(rows)
    assert [c["met"] for c in checks] == [True, False]
    assert checks[0]["figure"] == "sparsegpt 0.95000 vs magnitude 0.90000"
    assert [c["met"] for c in bench.targets(rows[:2])] == [True, None]
    text = bench.format_targets(checks)
    assert "SparseGPT beats magnitude at 2:4: NOT met" in text


def test_table_rows_and_errors(bench):
    rows = [
        {
            "row": "fp32",
            "cosine_mean": 1.0,
            "cosine_min": 1.0,
            "knn_accuracy": 0.4158,
            "size_bytes": 90875406,
        },
        {"row": "x", "error": "ConfigError: bad"},
    ]
    lines = bench.table(rows).splitlines()
    assert lines[2] == "| fp32 | 1.00000 | 1.00000 | 0.4158 | 90,875,406 | - |  |"
    assert lines[3] == "| x | - | - | - | - | - | ConfigError: bad |"


def _resnet_rows(peer_accuracy=0.985):
    return [
        {"row": "fp32", "params": 80290, "macs": 4597440, "latency_ms": 30.0, "accuracy": 0.99},
        {
            "row": "structured-50",
            "params": 20710,
            "macs": 1165152,
            "latency_ms": 15.0,
            "accuracy": 0.9855,
        },
        {"row": "torch-pruning-50", "params": 20710, "accuracy": peer_accuracy},
    ]


def test_resnet_targets_against_fp32_and_the_peer(bench):
    rows = _resnet_rows()
    bench.add_comparisons(rows, rows[0])
    assert rows[1]["speedup"] == pytest.approx(2.0)
    assert rows[1]["drop"] == pytest.approx(0.45)
    checks = bench.resnet_targets(rows)
    assert [c["met"] for c in checks] == [True, True, True, True, True]
    assert checks[0]["figure"] == "3.88x (20,710 vs 80,290)"
    assert checks[4]["figure"] == "slimkit 98.55 vs torch-pruning 98.50"
    worse = _resnet_rows(peer_accuracy=0.99)
    bench.add_comparisons(worse, worse[0])
    assert bench.resnet_targets(worse)[4]["met"] is False


def test_resnet_targets_not_met_or_not_measured(bench):
    rows = _resnet_rows()
    rows[1].update(params=50000, latency_ms=25.0, accuracy=0.97)
    bench.add_comparisons(rows, rows[0])
    assert [c["met"] for c in bench.resnet_targets(rows)] == [False, True, False, False, False]
    errored = _resnet_rows()
    errored[2] = {"row": "torch-pruning-50", "error": "ModuleNotFoundError: torch_pruning"}
    bench.add_comparisons(errored, errored[0])
    checks = bench.resnet_targets(errored)
    assert [c["met"] for c in checks] == [True, True, True, True, None]
    assert checks[4]["figure"] == "slimkit 98.55 vs torch-pruning -"
    assert [c["met"] for c in bench.resnet_targets(errored[:1])] == [None] * 5


def test_resnet_table_rows_and_errors(bench):
    rows = [*_resnet_rows()[:2], {"row": "torch-pruning-50", "error": "ImportError: x"}]
    rows[0]["note"] = "saved + loaded"
    bench.add_comparisons(rows, rows[0])
    lines = bench.resnet_table(rows).splitlines()
    assert (
        lines[2] == "| fp32 | 80,290 | 4,597,440 | 30.00 | 1.00x | 99.00 | +0.00 | saved + loaded |"
    )
    assert lines[3] == "| structured-50 | 20,710 | 1,165,152 | 15.00 | 2.00x | 98.55 | +0.45 |  |"
    assert lines[4] == "| torch-pruning-50 | - | - | - | - | - | - | ImportError: x |"


def _lenet_rows():
    """(fp32, unstructured-90) row pairs of digits-lenet and digits-mlp."""
    pairs = []
    for task, acc, pruned_acc in (("digits-lenet", 0.99, 0.987), ("digits-mlp", 0.98, 0.97)):
        base = {"task": task, "row": "fp32", "accuracy": acc, "model_bytes": 1000}
        pruned = {
            "task": task,
            "row": "unstructured-90",
            "accuracy": pruned_acc,
            "model_bytes": 200,
        }
        pairs.append([base, pruned])
    return pairs


def test_lenet_targets_and_table(bench):
    lenet, mlp = _lenet_rows()
    for pair in (lenet, mlp):
        bench.add_comparisons(pair, pair[0])
    rows = lenet + mlp
    checks = bench.lenet_targets(rows)
    assert [c["met"] for c in checks] == [True, True]
    assert checks[1]["figure"] == "0.200x (200 bytes)"
    lines = bench.lenet_table(rows).splitlines()
    assert lines[3] == "| digits-lenet | unstructured-90 | 98.70 | +0.30 | 200 | 0.200x |  |"
    assert lines[5] == "| digits-mlp | unstructured-90 | 97.00 | +1.00 | 200 | 0.200x |  |"
    lenet[1].update(accuracy=0.98, model_bytes=300)
    bench.add_comparisons(lenet, lenet[0])
    assert [c["met"] for c in bench.lenet_targets(rows)] == [False, False]
    assert [c["met"] for c in bench.lenet_targets(mlp)] == [None, None]  # only mlp: no target


def test_finetune_only_keeps_the_shipped_finetune_stage(bench):
    from slimkit.recipe import resolve

    shipped = Recipe.from_file(resolve("structured-50")).to_dict()
    recipe = bench.finetune_only(shipped)
    assert recipe["stages"] == [s for s in shipped["stages"] if "finetune" in s]
    assert Recipe.from_dict(recipe).stages[0].epochs == 10
    with pytest.raises(ValueError, match="no finetune stage"):
        bench.finetune_only({"name": "x", "stages": [{"prune": {"method": "magnitude"}}]})


def test_merge_keeps_other_sections_and_reads_the_older_layout(bench):
    old = {"rows": [{"row": "fp32"}], "targets": []}
    resnet = {"title": "R", "description": "d", "rows": [], "targets": []}
    merged = bench.merge(old, {"resnet": resnet})
    assert list(merged["sections"]) == ["minilm", "resnet"]
    assert merged["sections"]["minilm"]["rows"] == [{"row": "fp32"}]
    lenet = {"title": "L", "description": "d", "rows": [], "targets": []}
    again = bench.merge(merged, {"lenet": lenet, "resnet": {**resnet, "title": "R2"}})
    assert list(again["sections"]) == ["minilm", "resnet", "lenet"]
    assert again["sections"]["resnet"]["title"] == "R2"
    assert bench.merge({}, {"lenet": lenet}) == {"sections": {"lenet": lenet}}


def test_render_writes_every_section(bench):
    results = bench.merge({"rows": [{"row": "fp32", "cosine_mean": 1.0}], "targets": []}, {})
    results["sections"]["lenet"] = {
        "title": "Lenet",
        "description": "d",
        "rows": [{"task": "digits-lenet", "row": "fp32", "accuracy": 0.99}],
        "targets": [{"target": "t", "figure": "f", "met": None}],
    }
    text = bench.render(results)
    assert text.index("## Unstructured and 2:4 pruning") < text.index("## Lenet")
    assert "| fp32 | 1.00000 |" in text
    assert "| digits-lenet | fp32 | 99.00 |" in text
    assert "- t: not measured (f)" in text


def test_heads_targets_and_table(bench):
    rows = [
        {"row": "fp32", "params": 22_700_000, "latency_ms": 100.0, "cosine_mean": 1.0},
        {"row": "heads-ffn", "params": 20_000_000, "latency_ms": 80.0, "cosine_mean": 0.84},
    ]
    bench.add_comparisons(rows, rows[0])
    assert rows[1]["speedup"] == pytest.approx(1.25)
    checks = bench.heads_targets(rows)
    assert [c["met"] for c in checks] == [True, True]
    assert "1.135x fewer parameters" in checks[0]["figure"]
    assert "cos mean 0.84000" in checks[1]["figure"]
    assert "| heads-ffn | 20,000,000 |" in bench.heads_table(rows)
    missing = bench.heads_targets([rows[0], {"row": "heads-ffn", "error": "x"}])
    assert [c["met"] for c in missing] == [None, None]


def test_merge_keeps_the_section_order(bench):
    saved = {"sections": {"lenet": {"rows": []}, "minilm": {"rows": []}}}
    merged = bench.merge(saved, {"heads": {"rows": []}})
    assert list(merged["sections"]) == ["minilm", "heads", "lenet"]
