from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from slimkit.compressed import CompressedModule
from slimkit.data import Batch
from slimkit.evaluate.result import Report
from slimkit.evaluate.runner import Candidate, evaluate_candidates, evaluate_model, layer_notes
from slimkit.tasks.base import Task


class FakeQuant(CompressedModule):
    """A Linear(8, 8) stand-in storing int8 codes, marked simulated."""

    simulated = True

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("codes", torch.ones(8, 8, dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.codes.float().t() + self.bias

    def n_params(self) -> int:
        return 64

    def describe(self) -> str:
        return "int4 fake quant"


class TinyTask(Task):
    name = "tiny"
    description = "a tiny regression"
    primary_metric = "score"
    modality = "image"
    default_batch = 4

    def __init__(self) -> None:
        self.evaluated: list[nn.Module] = []

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()

    def calibration_data(self) -> list[Batch]:
        return [torch.randn(2, 8)]

    def example_inputs(self) -> Batch:
        return torch.randn(1, 8)

    def latency_inputs(self, batch: int | None = None) -> Batch:
        return torch.randn(batch or self.default_batch, 8)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.evaluated.append(model)
        return {"score": 0.5 + 0.1 * len(self.evaluated), "loss": 1.0}

    def robustness(self, model: nn.Module) -> dict[str, float]:
        return {"noise_0.1": 0.25}


def save_artifact(model: nn.Module, path: Path) -> Path:
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    (path / "slimkit.json").write_text("{}")
    return path


def artifact_bytes(path: Path) -> int:
    return sum((path / n).stat().st_size for n in ("model.safetensors", "slimkit.json"))


@pytest.fixture
def candidates(tmp_path: Path) -> list[Candidate]:
    task = TinyTask()
    base = task.model()
    small = nn.Sequential(FakeQuant(), nn.ReLU(), FakeQuant(), nn.Linear(8, 2)).eval()
    return [
        Candidate("fp32", base, save_artifact(base, tmp_path / "fp32")),
        Candidate("q4", small, save_artifact(small, tmp_path / "q4"), "q4-rtn", ["took 1 s"]),
    ]


def test_report_measures_every_candidate(candidates: list[Candidate]) -> None:
    task = TinyTask()
    steps: list[str] = []
    report = evaluate_candidates(task, candidates, runs=3, warmup=1, batch=5, progress=steps.append)
    assert report.task == "tiny"
    assert [r.name for r in report.results] == ["fp32", "q4"]
    assert task.evaluated == [c.model for c in candidates]
    base, q4 = report.results
    assert base.metrics == {"score": pytest.approx(0.6), "loss": 1.0}
    assert base.primary_metric == "score" and q4.recipe == "q4-rtn"
    assert base.size_bytes == artifact_bytes(candidates[0].artifact_dir)
    assert q4.size_bytes == artifact_bytes(candidates[1].artifact_dir)
    assert base.params == 8 * 8 + 8 + 8 * 2 + 2
    assert q4.params == 2 * (64 + 8) + 8 * 2 + 2
    assert (base.macs, q4.macs) == (8 * 8 + 8 * 2, 2 * 8 * 8 + 8 * 2)
    assert base.peak_mem_bytes >= base.params * 4
    assert base.robustness == {"noise_0.1": 0.25}
    assert (base.simulated, q4.simulated) == (False, True)
    assert q4.notes == ["took 1 s", "2 x FakeQuant: int4 fake quant"]
    assert base.notes == []
    for r in report.results:
        assert r.latency_ms["batch"] == 5 and r.latency_ms["runs"] == 3
        assert r.latency_ms["min"] <= r.latency_ms["median"] <= r.latency_ms["max"]
    assert len(steps) >= 3 and any("timing" in s for s in steps)
    assert Report.from_dict(json.loads(report.to_json())) == report


def test_default_batch_is_the_task_default(candidates: list[Candidate]) -> None:
    report = evaluate_candidates(TinyTask(), candidates[:1], runs=1, warmup=0)
    assert report.results[0].latency_ms["batch"] == TinyTask.default_batch


def test_no_candidates_or_runs_is_refused(candidates: list[Candidate]) -> None:
    with pytest.raises(ValueError):
        evaluate_candidates(TinyTask(), [])
    with pytest.raises(ValueError, match="runs"):
        evaluate_candidates(TinyTask(), candidates, runs=0)


def test_layer_notes_group_by_kind() -> None:
    model = nn.Sequential(FakeQuant(), FakeQuant(), FakeQuant(), nn.Linear(1, 1))
    assert layer_notes(model) == ["3 x FakeQuant: int4 fake quant"]
    assert layer_notes(nn.Linear(1, 1)) == []


def test_evaluate_model_with_an_artifact_dir(candidates: list[Candidate]) -> None:
    cand = candidates[1]
    result = evaluate_model(cand.model, TinyTask(), cand.artifact_dir, runs=2)
    assert result.size_bytes == artifact_bytes(cand.artifact_dir)
    assert result.latency_ms["runs"] == 2


def test_evaluate_model_saves_to_a_temporary_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[Path] = []

    def fake_save(model: nn.Module, path: Path, **kwargs: Any) -> Path:
        saved.append(save_artifact(model, Path(path)))
        return Path(path)

    monkeypatch.setitem(sys.modules, "slimkit.io.artifact", types.SimpleNamespace(save=fake_save))
    model = TinyTask().model()
    result = evaluate_model(model, TinyTask(), runs=1)
    assert len(saved) == 1
    assert result.size_bytes > 0 and result.name == "model"
    assert not saved[0].exists()  # the temporary artifact is removed
