"""Gradual unstructured pruning: the sparsity schedules, nested masks, the gradual method."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import slimkit
import slimkit.prune.schedule as schedule_module
from slimkit.config import Scope
from slimkit.errors import ConfigError, DataError
from slimkit.formats.bitmask import unpack_mask
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.prune.importance import Criterion
from slimkit.prune.schedule import (
    GradualConfig,
    Schedule,
    nested_keep_masks,
    sparsity_schedule,
)
from slimkit.recipe import Recipe, shipped_dir
from slimkit.train.finetune import FinetuneConfig
from tests.prune.toys import ToyTask, inputs, net, prune_recipe

LAYERS = ("conv", "fc1", "fc2")


# -- the schedules (pure) ----------------------------------------------------------------
@given(
    sparsity=st.floats(min_value=1e-12, max_value=0.999),
    steps=st.integers(min_value=1, max_value=50),
    kind=st.sampled_from(list(Schedule)),
)
def test_schedule_is_monotone_positive_and_ends_at_the_target(
    sparsity: float, steps: int, kind: Schedule
) -> None:
    plan = sparsity_schedule(sparsity, steps, kind)
    assert len(plan) == steps
    assert plan[-1] == sparsity
    assert plan[0] > 0
    assert all(a <= b for a, b in itertools.pairwise(plan))
    assert all(0 < s <= sparsity for s in plan)


def test_schedule_formulas() -> None:
    it = sparsity_schedule(0.9, 4, "iterative")
    assert it == pytest.approx([1 - 0.1 ** (t / 4) for t in range(1, 5)], abs=1e-15)
    agp = sparsity_schedule(0.9, 4, "agp")
    assert agp == pytest.approx([0.9 * (1 - (1 - t / 4) ** 3) for t in range(1, 5)], abs=1e-15)
    # iterative removes the same fraction of the remaining weights each step
    remaining = [1.0] + [1 - s for s in it]
    ratios = [b / a for a, b in itertools.pairwise(remaining)]
    assert ratios == pytest.approx([0.1**0.25] * 4)
    assert sparsity_schedule(0.0, 3, "agp") == [0.0, 0.0, 0.0]
    assert sparsity_schedule(0.5, 1, "iterative") == [0.5]


@pytest.mark.parametrize("args", [(1.0, 4), (-0.1, 4), (0.5, 0)])
def test_schedule_rejects_bad_arguments(args: tuple[float, int]) -> None:
    with pytest.raises(ValueError):
        sparsity_schedule(*args, "agp")


# -- nested masks (pure) -----------------------------------------------------------------
@given(
    seed=st.integers(0, 2**16),
    scope=st.sampled_from(list(Scope)),
    normalize=st.booleans(),
    kind=st.sampled_from(list(Schedule)),
)
def test_nested_masks_are_nested_and_exact(
    seed: int, scope: Scope, normalize: bool, kind: Schedule
) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (4, 3, 2), (7,)]
    keeps = [torch.ones(s, dtype=torch.bool) for s in shapes]
    for sparsity in sparsity_schedule(0.8, 4, kind):
        # fresh scores each step, many ties at zero (as taylor gives for dead units)
        scores = [
            torch.rand(s, generator=g).round(decimals=1) * (k.float())
            for s, k in zip(shapes, keeps, strict=True)
        ]
        new = nested_keep_masks(scores, keeps, sparsity, scope, 0.0, normalize)
        for k_new, k_old in zip(new, keeps, strict=True):
            assert not bool((k_new & ~k_old).any())
        dropped = [k.numel() - int(k.sum()) for k in new]
        total = sum(k.numel() for k in new)
        if scope is Scope.GLOBAL:
            assert sum(dropped) == round(sparsity * total)
        else:
            assert dropped == [round(sparsity * k.numel()) for k in new]
        keeps = new


def test_first_step_equals_keep_masks() -> None:
    from slimkit.prune.importance import keep_masks

    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(5, 4, generator=g), 3 * torch.rand(9, generator=g)]
    ones = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    for scope in Scope:
        got = nested_keep_masks(scores, ones, 0.6, scope, 0.01, True)
        want = keep_masks(scores, 0.6, scope, 0.01, True)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# -- the gradual method ------------------------------------------------------------------
def gradual(task: ToyTask | None = None, **options: Any) -> nn.Module:
    recipe = prune_recipe("gradual", **{"lr": 0.01, **options})
    return slimkit.compress(net(), recipe, task=task or ToyTask())


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exact_final_sparsity(criterion: str, scope: str) -> None:
    model = gradual(sparsity=0.8, steps=3, scope=scope, criterion=criterion, min_density=0.0)
    sizes = {n: net().get_submodule(n).weight.numel() for n in LAYERS}
    kept = {n: model.get_submodule(n).n_params() for n in LAYERS}
    assert type(model.conv) is SparseConv2d and type(model.fc1) is SparseLinear
    if scope == "layer":
        assert kept == {n: sizes[n] - round(0.8 * sizes[n]) for n in LAYERS}
    else:
        total = sum(sizes.values())
        assert sum(kept.values()) == total - round(0.8 * total)
    assert not model.training


@pytest.mark.parametrize("kind", ["iterative", "agp"])
def test_masks_are_nested_across_steps(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, torch.Tensor]] = []
    real = schedule_module.finetune

    def recording(model: nn.Module, *args: Any, **kwargs: Any) -> list[float]:
        seen.append({n: model.get_submodule(n).weight != 0 for n in LAYERS})
        losses = real(model, *args, **kwargs)
        for n in LAYERS:  # the fine-tuning kept the pruned weights at zero
            assert not bool((model.get_submodule(n).weight[~seen[-1][n]] != 0).any())
        return losses

    monkeypatch.setattr(schedule_module, "finetune", recording)
    model = gradual(sparsity=0.9, steps=4, schedule=kind)
    assert len(seen) == 4
    final = {}
    for n in LAYERS:
        layer = model.get_submodule(n)
        final[n] = unpack_mask(layer.mask, layer.dense_weight().numel()).reshape(
            layer.dense_weight().shape
        )
    for before, after in zip(seen, [*seen[1:], final], strict=True):
        for n in LAYERS:
            assert not bool((after[n] & ~before[n]).any())
    densities = [sum(int(m[n].sum()) for n in LAYERS) for m in seen]
    assert densities == sorted(densities, reverse=True) and densities[0] > densities[-1]


def test_one_step_without_finetuning_is_one_shot_pruning() -> None:
    a = gradual(sparsity=0.6, steps=1, finetune_epochs=0, task=ToyTask(labelled=False))
    b = slimkit.compress(net(), prune_recipe("unstructured", sparsity=0.6))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_finetuning_needs_labelled_data_before_any_work() -> None:
    with pytest.raises(DataError, match="labelled training data"):
        gradual(task=ToyTask(labelled=False))


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = gradual(sparsity=0.7, steps=2)
    slimkit.save(model, tmp_path / "g")
    back = slimkit.load(tmp_path / "g", model=net(seed=4))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize(
    "options",
    [
        {"steps": 0},
        {"finetune_epochs": -1},
        {"lr": 0.0},
        {"seed": -1},
        {"schedule": "cubic"},
        {"criterion": "l1"},
        {"sparsity": 1.0},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=f"prune.gradual.{next(iter(options))}"):
        GradualConfig(**options)


def test_shipped_unstructured_90_recipe() -> None:
    r = Recipe.from_file(shipped_dir() / "unstructured-90.yaml")
    assert r.name == "unstructured-90"
    assert r.stages == (
        GradualConfig(
            sparsity=0.9,
            scope=Scope.GLOBAL,
            steps=4,
            schedule=Schedule.AGP,
            criterion=Criterion.MAGNITUDE,
            finetune_epochs=2,
            lr=2e-3,
        ),
        FinetuneConfig(epochs=10, lr=2e-3),
    )
    assert Recipe.from_dict(r.to_dict()) == r
    model = slimkit.compress(net(), shipped_dir() / "unstructured-90.yaml", task=ToyTask())
    layers = [model.conv, model.fc1, model.fc2]
    kept = sum(m.values.numel() for m in layers)
    total = sum(int(torch.Size(m.weight_shape).numel()) for m in layers)
    assert kept == total - round(0.9 * total)  # global scope: exact overall
