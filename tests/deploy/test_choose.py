"""Choosing the runtime by measuring: the fastest faithful export wins, torch itself and
unfaithful runtimes never do, and ``format="auto"`` records what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimkit
from slimkit.cpu import device
from slimkit.deploy import choose
from slimkit.deploy.choose import Measured, fastest, measure_runtimes
from slimkit.errors import ConfigError
from tests.deploy.toys import ToyImageTask


def test_the_fastest_faithful_export_wins() -> None:
    rows = [
        Measured("torch", None, 1.0, 1.0),  # fastest, but not an export
        Measured("onnxruntime", "onnx", 3.0, 0.99999),
        Measured("openvino", "openvino", 2.0, 0.99),  # faster, not faithful
    ]
    best = fastest(rows)
    assert best is not None and best.runtime == "onnxruntime"
    assert fastest(rows[:1] + rows[2:]) is None


def test_each_runtime_is_measured_on_its_own_outputs(tmp_path: Path) -> None:
    toy = ToyImageTask()
    rows = measure_runtimes(
        toy.model(), toy.x[:2], toy.x[:16], tmp_path, slimkit.export, ["onnxruntime"], runs=1
    )
    assert [r.runtime for r in rows] == ["torch", "onnxruntime"]
    assert rows[1].format == "onnx" and rows[1].cosine > 0.99999 and rows[1].median_ms > 0


def test_auto_writes_the_choice_and_records_the_measurements(tmp_path: Path) -> None:
    toy = ToyImageTask()
    out = slimkit.export(toy.model(), tmp_path / "x", "auto", toy.x[:2], inputs=toy.x, runs=2)
    meta = json.loads((out / "export.json").read_text())
    chosen = meta["chosen"]
    measured = {r["runtime"]: r for r in chosen["measured"]}
    assert measured["torch"]["cosine"] == 1.0
    assert meta["format"] == measured[chosen["runtime"]]["format"]
    exports = [r for r in measured.values() if r["format"] and r["faithful"]]
    assert chosen["runtime"] == min(exports, key=lambda r: r["median_ms"])["runtime"]
    assert chosen["device"] == device()


def test_no_faithful_runtime_is_an_error_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(choose, "FAITHFUL_COSINE", 1.5)  # no runtime can keep it
    toy = ToyImageTask()
    with pytest.raises(ConfigError, match=r"no runtime keeps the outputs' cosine >= 1.5"):
        slimkit.export(toy.model(), tmp_path / "x", "auto", toy.x[:2], runs=1)
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the measuring exports are gone too


def test_torch_itself_is_timed_alternately_with_the_exports(tmp_path: Path) -> None:
    toy = ToyImageTask()
    slow = torch.nn.Sequential(toy.model())
    rows = measure_runtimes(slow, toy.x[:2], toy.x[:4], tmp_path, slimkit.export, [], runs=1)
    assert [r.runtime for r in rows] == ["torch"] and fastest(rows) is None
