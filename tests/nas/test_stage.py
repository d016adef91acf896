"""The nas stage through the pipeline, artifacts of searched models, and the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import slimkit
from slimkit.cli import main
from slimkit.errors import ArtifactError, ConfigError
from slimkit.io.artifact import MANIFEST
from slimkit.nas import search as search_mod
from slimkit.nas.stage import NasConfig
from slimkit.tasks.searched import Genome, SearchedMLP, build

from .conftest import CNN_SPACE


def recipe(**options):
    opts = {"method": "evolution", "population": 3, "generations": 1, "epochs": 1}
    return {"name": "nas-toy", "stages": [{"nas": {**opts, "final_epochs": 1, **options}}]}


def test_stage_returns_searched_model_and_artifact_round_trip(toy_task, tmp_path) -> None:
    model = slimkit.compress(toy_task.model(), recipe(max_params_ratio=0.25), task=toy_task)
    assert isinstance(model, SearchedMLP)
    assert sum(p.numel() for p in model.parameters()) <= 0.25 * (16 * 64 + 64 + 64 * 3 + 3)
    path = slimkit.save(model, tmp_path / "a")
    source = json.loads((path / MANIFEST).read_text())["source"]
    assert source["class"] == "slimkit.tasks.searched:SearchedMLP" and "kwargs" in source
    loaded = slimkit.load(path)
    x = toy_task.x[:5]
    assert torch.equal(loaded(x), model(x))


def test_the_stage_returns_its_search_and_report_files(toy_task, tmp_path) -> None:
    from slimkit.api import compress_run
    from slimkit.nas.stage import SEARCH_FRONT, SEARCH_PLOT

    run = compress_run(toy_task.model(), recipe(max_params_ratio=0.25), task=toy_task)
    model = run.model
    assert list(run.files()) == [SEARCH_PLOT, SEARCH_FRONT]
    for name, write in run.files().items():
        write(tmp_path / name)
    assert (tmp_path / SEARCH_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    front = json.loads((tmp_path / SEARCH_FRONT).read_text())
    assert front["winner"]["params"] == sum(p.numel() for p in model.parameters())
    # the manifest keeps the search as the stage's record
    path = slimkit.save(model, tmp_path / "a")
    stages = json.loads((path / MANIFEST).read_text())["stages"]
    assert [(s["kind"], s["method"]) for s in stages] == [("nas", "evolution")]
    assert stages[0]["record"] == front


def test_searched_cnn_artifact_round_trip(tmp_path) -> None:
    g = Genome("cnn", (1, 8, 8), 10, ((4, 5, False), (2, 3, True)), (8,))
    model = build(g).eval()
    loaded = slimkit.load(slimkit.save(model, tmp_path / "cnn"))
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert CNN_SPACE.contains(g)


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        ("this:Zen", {}, "not registered"),  # importing `this` prints: never imported
        ("torch.nn:Linear", {"in_features": 1, "out_features": 1}, "not registered"),
        ("slimkit.tasks.searched:SearchedMLP", {"hidden": {"a": 1}}, "JSON scalars or lists"),
        ("slimkit.tasks.searched:SearchedMLP", {"hidden": [10**6] * 3}, "source kwargs do not fit"),
        ("slimkit.tasks.searched:build", {"genome": 1}, "not registered"),
        (
            "slimkit.tasks.searched:SearchedMLP",
            {"in_features": 4, "num_classes": 2, "hidden": [10**6] * 3},
            "would take",  # sized on the meta device first: nothing allocated
        ),
    ],
)
def test_kwargs_source_refuses_other_classes(tmp_path, cls, kwargs, expected) -> None:
    path = slimkit.save(build(Genome("mlp", (4,), 2, (), (3,))), tmp_path / "m")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["source"] = {"class": cls, "kwargs": kwargs}
    (path / MANIFEST).write_text(json.dumps(manifest))
    had_this = "this" in sys.modules
    with pytest.raises(ArtifactError, match=expected):
        slimkit.load(path)
    assert ("this" in sys.modules) == had_this


def test_task_without_space_is_a_config_error(toy_task, monkeypatch) -> None:
    monkeypatch.setattr(type(toy_task), "search_space", None)
    with pytest.raises(ConfigError, match="declares no search space"):
        slimkit.compress(toy_task.model(), recipe(max_params=100), task=toy_task)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "at least one limit"),
        ({"max_params_ratio": 0.0}, "(0, 1]"),
        ({"max_params_ratio": 1.5}, "(0, 1]"),
        ({"max_params": 10, "resume": True}, "only with a log"),
    ],
)
def test_config_checks(options, expected) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("]", r"\]")):
        NasConfig(**options)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--task", "digits-lenett", "--max-params-ratio", "0.25"), "digits-lenet"),
        (("--task", "digits-lenet", "--max-params-ratio", "0"), "max_params_ratio"),
        (("--task", "digits-lenet", "--max-params-ratio", "1.5"), "max_params_ratio"),
        (("--task", "digits-resnet", "--max-params-ratio", "0.25"), "no search space"),
    ],
)
def test_cli_bad_input_exits_2(capsys, tmp_path, args, expected) -> None:
    code, text = cli(capsys, "search", *args, "--out", tmp_path / "o")
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], text
    assert "Traceback" not in text


def test_cli_interrupt_keeps_log_and_says_resume(capsys, tmp_path, monkeypatch) -> None:
    calls = []

    def interrupted(genome, seed, settings, data):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(genome)
        return 0.5

    monkeypatch.setattr(search_mod, "train_trial", interrupted)
    out = tmp_path / "o"
    args = ("--task", "digits-lenet", "--max-params-ratio", "0.25", "--population", "4")
    code, text = cli(capsys, "search", *args, "--out", out)
    assert code == 130 and "Traceback" not in text
    assert "--resume" in text and "2 finished trials" in text
    assert len((out / "search.jsonl").read_text().splitlines()) == 2
