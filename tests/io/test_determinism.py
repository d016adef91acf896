"""Reproducible artifacts: with ``SOURCE_DATE_EPOCH`` set, the same recipe on the same model
gives byte-identical artifact files, in one process run after run."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit.io import save as save_mod


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.conv(x).mean((2, 3)))))


RECIPES: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "w8-rtn": {"name": "w8", "stages": [{"quantize": {"bits": 8, "granularity": "per_channel"}}]},
    "prune-50": {"name": "p50", "stages": [{"prune": {"sparsity": 0.5}}]},
    "kmeans-4bit": {"name": "km", "stages": [{"quantize": {"method": "kmeans", "bits": 4}}]},
    "deep-compression": {
        "name": "dc",
        "stages": [
            {"prune": {"sparsity": 0.5}},
            {"quantize": {"method": "kmeans", "bits": 4}},
            {"encode": {"method": "huffman"}},
        ],
    },
}


def build(recipe: dict[str, Any] | None) -> nn.Module:
    torch.manual_seed(0)  # a fresh model each time, from the same seed
    model = Net().eval()
    if recipe is not None:
        slimkit.compress(model, recipe)
    return model


def artifact_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("name", list(RECIPES))
def test_same_recipe_gives_identical_bytes(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one = slimkit.save(build(RECIPES[name]), tmp_path / "one")
    two = slimkit.save(build(RECIPES[name]), tmp_path / "two")
    assert artifact_bytes(one) == artifact_bytes(two)
    assert json.loads((one / "slimkit.json").read_text())["created"] == "2023-11-14T22:13:20+00:00"


def test_created_is_now_without_source_date_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    d = slimkit.save(build(None), tmp_path / "a")
    created = datetime.datetime.fromisoformat(
        json.loads((d / "slimkit.json").read_text())["created"]
    )
    assert before <= created <= datetime.datetime.now(datetime.timezone.utc)


@pytest.mark.parametrize(("epoch", "created"), [("0", "1970-01-01T00:00:00+00:00"), ("", None)])
def test_source_date_epoch_parsing(
    epoch: str, created: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
    if created is None:  # empty: unset
        assert save_mod._created().endswith("+00:00")
        assert not save_mod._created().startswith("1970")
    else:
        assert save_mod._created() == created


def test_saving_twice_from_one_model_is_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing in the save itself (dict order, tensor order, shared tensors) varies."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    model = build(RECIPES["prune-50"])
    model.head = model.fc2  # a module shared under two names: its tensors are stored once
    one = slimkit.save(model, tmp_path / "one")
    two = slimkit.save(model, tmp_path / "two", overwrite=True)
    assert artifact_bytes(one) == artifact_bytes(two)


# -- benchmarks/determinism.py's pure parts ---------------------------------------------------
def test_determinism_script_compares_and_tabulates(tmp_path: Path) -> None:
    from tests.benchmarks.conftest import load_script

    bench = load_script("determinism.py")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("SOURCE_DATE_EPOCH", "0")
    try:
        one = slimkit.save(build(RECIPES["w8-rtn"]), tmp_path / "one")
        two = slimkit.save(build(RECIPES["w8-rtn"]), tmp_path / "two")
        other = slimkit.save(build(RECIPES["prune-50"]), tmp_path / "other")
    finally:
        monkey.undo()
    same, differ = bench.compare(one, two), bench.compare(one, other)
    assert same["identical"] and "difference" not in same
    assert not differ["identical"] and differ["difference"].startswith("tensor ")
    rows = [{"task": "t", "recipe": "r", **same}, {"task": "t", "recipe": "x", "error": "exit 2"}]
    lines = bench.table(rows).splitlines()
    assert lines[2].startswith("| t | r | yes | ")
    assert lines[3] == "| t | x | - | - | - | exit 2 |"
    variant = bench.recipe_file("w4-gptq-per-channel", tmp_path)
    recipe = slimkit.Recipe.from_file(variant)
    assert recipe.name == "w4-gptq-per-channel"
    assert bench.recipe_file("w8-rtn", tmp_path) == "w8-rtn"
