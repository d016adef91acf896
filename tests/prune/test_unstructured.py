"""Unstructured pruning by criterion (magnitude, wanda, taylor) and the magnitude method."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit.config import Scope
from slimkit.context import Context
from slimkit.errors import ConfigError, DataError, RecipeError
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.prune.importance import importance, keep_masks, min_keep
from slimkit.prune.magnitude import MagnitudeConfig, magnitude_masks
from slimkit.prune.unstructured import UnstructuredConfig
from slimkit.recipe import Recipe
from tests.prune.toys import ToyTask, inputs, net, prune_recipe

LAYERS = ("conv", "fc1", "fc2")


def masked(model: nn.Module, keeps: dict[str, torch.Tensor]) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in keeps.items():
            out.get_submodule(name).weight.mul_(keep)
    return out


def expected_keeps(criterion: str, ctx: Context, **options: Any) -> dict[str, torch.Tensor]:
    """The keep-masks the stage should apply, from the criterion and ``keep_masks``."""
    model = net()
    crit = importance(criterion)
    scores = crit(model, list(LAYERS), ctx)
    keeps = keep_masks([scores[n] for n in LAYERS], normalize=crit.normalize, **options)
    return dict(zip(LAYERS, keeps, strict=True))


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_compress_applies_the_criterion_masks(criterion: str, scope: str) -> None:
    task = ToyTask()
    model = slimkit.compress(
        net(),
        prune_recipe("unstructured", criterion=criterion, sparsity=0.6, scope=scope),
        task=task,
    )
    ctx = Context(names=list(LAYERS), data=task.calibration_data(), task=task)
    keeps = expected_keeps(criterion, ctx, sparsity=0.6, scope=Scope(scope), min_density=0.01)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(model(x), masked(net(), keeps)(x))
    assert type(model.conv) is SparseConv2d and type(model.fc1) is SparseLinear
    total = sum(net().get_submodule(n).weight.numel() for n in LAYERS)
    kept = sum(model.get_submodule(n).n_params() for n in LAYERS)
    if scope == "layer":
        for n in LAYERS:
            size = net().get_submodule(n).weight.numel()
            assert model.get_submodule(n).n_params() == size - round(0.6 * size)
    else:
        assert kept == total - round(0.6 * total)


def test_magnitude_criterion_equals_the_magnitude_method() -> None:
    a = slimkit.compress(net(), prune_recipe("unstructured", sparsity=0.7, scope="global"))
    b = slimkit.compress(net(), prune_recipe("magnitude", sparsity=0.7, scope="global"))
    for n in LAYERS:
        assert torch.equal(a.get_submodule(n).dense_weight(), b.get_submodule(n).dense_weight())


def test_magnitude_method_keeps_its_masks_below_the_floor() -> None:
    ref = net()
    model = slimkit.compress(copy.deepcopy(ref), prune_recipe("magnitude", sparsity=0.5))
    weights = [ref.get_submodule(n).weight for n in LAYERS]
    for n, keep in zip(LAYERS, magnitude_masks(weights, 0.5, Scope.LAYER), strict=True):
        want = ref.get_submodule(n).weight.detach() * keep
        assert torch.equal(model.get_submodule(n).dense_weight(), want)


@pytest.mark.parametrize("method", ["magnitude", "unstructured"])
def test_min_density_holds_a_layer_global_scope_would_empty(method: str) -> None:
    ref = net()
    with torch.no_grad():
        ref.fc2.weight.mul_(1e-6)
    recipe = prune_recipe(method, sparsity=0.9, scope="global", min_density=0.05)
    model = slimkit.compress(copy.deepcopy(ref), recipe)
    assert model.fc2.n_params() == min_keep(64, 0.05) == 4
    total = sum(ref.get_submodule(n).weight.numel() for n in LAYERS)
    kept = sum(model.get_submodule(n).n_params() for n in LAYERS)
    assert kept == total - round(0.9 * total)  # the other layers make up for it
    no_floor = prune_recipe(method, sparsity=0.9, scope="global", min_density=0.0)
    assert slimkit.compress(copy.deepcopy(ref), no_floor).fc2.n_params() == 0


def test_wanda_global_normalises_while_magnitude_does_not() -> None:
    ref = net()
    with torch.no_grad():
        ref.fc2.weight.mul_(1e-3)
    data = [inputs()]
    mag = slimkit.compress(copy.deepcopy(ref), prune_recipe("unstructured", scope="global"))
    wanda = slimkit.compress(
        copy.deepcopy(ref), prune_recipe("unstructured", scope="global", criterion="wanda"), data
    )
    assert mag.fc2.density() <= 0.05  # raw |w|: the scaled layer goes first
    assert wanda.fc2.density() > 0.2  # normalised per layer: the scale does not matter


@pytest.mark.parametrize("task", [None, ToyTask(labelled=False)], ids=["no-task", "unlabelled"])
def test_taylor_without_labels_refused_before_any_work(task: ToyTask | None) -> None:
    model = net()
    ref = copy.deepcopy(model)
    with pytest.raises(DataError, match="labelled training data"):
        slimkit.compress(model, prune_recipe("unstructured", criterion="taylor"), task=task)
    assert type(model.fc1) is nn.Linear and torch.equal(model.fc1.weight, ref.fc1.weight)


def test_wanda_without_data_refused_before_any_work() -> None:
    model = net()
    with pytest.raises(DataError, match="wanda importance needs calibration data"):
        slimkit.compress(model, prune_recipe("unstructured", criterion="wanda"))
    assert type(model.conv) is nn.Conv2d


def test_unsupported_conv_refused_before_any_work() -> None:
    model = net()
    model.conv.padding_mode = "reflect"
    with pytest.raises(ConfigError, match="layer 'conv' cannot be pruned by unstructured"):
        slimkit.compress(model, prune_recipe("unstructured"))
    assert type(model.fc1) is nn.Linear


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("criterion", "l1", "magnitude, wanda, taylor"),
        ("criterion", "wand", "did you mean 'wanda'"),
        ("min_density", 1.5, "[0, 1]"),
        ("min_density", -0.1, "[0, 1]"),
        ("sparsity", 1.0, "[0, 1)"),
    ],
)
def test_config_ranges(key: str, value: Any, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"prune.unstructured.{key}: got") as info:
        UnstructuredConfig(**{key: value})
    assert allowed in str(info.value)


def test_magnitude_config_takes_min_density_but_no_criterion() -> None:
    assert MagnitudeConfig().min_density == 0.01
    with pytest.raises(ConfigError, match=r"prune\.magnitude\.min_density"):
        MagnitudeConfig(min_density=2.0)
    with pytest.raises(RecipeError, match="unknown key 'criterion'"):
        Recipe.from_dict(prune_recipe("magnitude", criterion="wanda"))


def test_recipe_round_trip(tmp_path: Path) -> None:
    r = Recipe.from_dict(
        prune_recipe("unstructured", criterion="taylor", scope="global", min_density=0.1)
    )
    assert r.stages == (
        UnstructuredConfig(criterion="taylor", scope="global", min_density=0.1),  # type: ignore[arg-type]
    )
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml(), encoding="utf-8")
    assert Recipe.from_file(path) == r


def test_pruned_artifact_round_trip(tmp_path: Path) -> None:
    task = ToyTask()
    model = slimkit.compress(net(), prune_recipe("unstructured", criterion="wanda"), task=task)
    slimkit.save(model, tmp_path / "a")
    back = slimkit.load(tmp_path / "a", model=net(seed=9))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
