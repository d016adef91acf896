"""Structured pruning (prune/structured.py): physically smaller models of standard layers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit.compressed import CompressedModule, count_params
from slimkit.context import Context
from slimkit.errors import ConfigError, DataError, ModelError
from slimkit.prune.graph import analyze
from slimkit.prune.importance import Criterion, importance
from slimkit.prune.structured import (
    StructuredConfig,
    class_scores,
    prunable,
    removed_classes,
)
from slimkit.recipe import Recipe, shipped_dir
from slimkit.select import select
from tests.prune.test_graph import (
    IMAGE,
    SEQUENCE,
    ConcatSplit,
    GroupedDepthwise,
    GRUHead,
    ResidualChain,
    SharedConv,
    Transformerish,
    Untraceable,
)
from tests.prune.toys import ToyTask, net, prune_recipe

Case = tuple[Callable[[], nn.Module], torch.Tensor, tuple[str, ...]]
#: model, example input, layers to ignore in the lossless check (a LayerNorm over a pruned
#: dim renormalises: removing even an all-zero channel there changes its output)
CASES: dict[str, Case] = {
    "residual": (ResidualChain, IMAGE, ()),
    "concat-split": (ConcatSplit, IMAGE, ()),
    "grouped-depthwise": (GroupedDepthwise, IMAGE, ()),
    "transformer": (Transformerish, SEQUENCE, ("proj",)),
    "gru-head": (GRUHead, IMAGE, ()),
    "shared-conv": (SharedConv, IMAGE, ()),
}


def fresh(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = CASES[name][0]()
    with torch.no_grad():  # BatchNorm statistics away from the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def structured(**options: Any) -> dict[str, Any]:
    return prune_recipe("structured", **options)


def pruned(name: str, **options: Any) -> nn.Module:
    x = CASES[name][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slimkit.compress(fresh(name), structured(**options), data=[x])


def zero_removed(model: nn.Module, x: torch.Tensor, config: StructuredConfig) -> None:
    """Zero the producer rows, biases and norm entries of the channels the stage will remove,
    so removing them leaves the output unchanged."""
    graph = analyze(model, x)
    selected = set(select(model, config.targets, config.ignore, (nn.Conv2d, nn.Linear)))
    groups = [g for g in graph.groups if prunable(g, selected)]
    producers = sorted({s.module for g in groups for s in g.sites if s.role == "out"})
    scores = importance("l1", unit="channel")(model, producers, Context(names=producers))
    with torch.no_grad():
        for g in groups:
            removed, _ = removed_classes(g, class_scores(g, scores), config)
            for s in g.sites:
                rows = [i for i, r in enumerate(s.roots) if r in removed]
                if s.role in ("out", "depthwise", "norm") and rows:
                    m = model.get_submodule(s.module)
                    m.weight[rows] = 0
                    if m.bias is not None:
                        m.bias[rows] = 0


@pytest.mark.parametrize("name", list(CASES))
def test_output_shape_kept_and_params_fall(name: str) -> None:
    x = CASES[name][1]
    before = fresh(name)
    model = pruned(name, ratio=0.5)
    with torch.no_grad():
        assert model(x).shape == before(x).shape
    assert count_params(model) < count_params(before)
    assert not any(isinstance(m, CompressedModule) for m in model.modules())


@pytest.mark.parametrize("name", list(CASES))
def test_removing_zero_channels_is_lossless(name: str) -> None:
    _, x, ignore = CASES[name]
    config = StructuredConfig(ratio=0.5, ignore=ignore)
    model = fresh(name)
    zero_removed(model, x, config)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slimkit.compress(model, structured(ratio=0.5, ignore=list(ignore)), data=[x])
    assert count_params(model) < count_params(reference)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_artifact_round_trip(name: str, tmp_path: Path) -> None:
    x = CASES[name][1]
    model = pruned(name, ratio=0.5)
    slimkit.save(model, tmp_path / "a")
    loaded = slimkit.load(tmp_path / "a", model=fresh(name, seed=1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_grouped_conv_keeps_its_groups_even() -> None:
    model = pruned("grouped-depthwise", ratio=0.5)
    conv = model.get_submodule("grouped.0")
    assert conv.groups == 2 and conv.in_channels == 4 and conv.out_channels == 6
    dw = model.get_submodule("depthwise.0")
    assert dw.groups == dw.in_channels == dw.out_channels == 6


def test_gru_head_is_left_untouched_with_a_warning() -> None:
    original = fresh("gru-head")
    gru = original.gru
    messages: list[str] = []
    with pytest.warns(UserWarning, match=r"'gru' \(GRU\)"):
        model = slimkit.compress(
            original, structured(ratio=0.5), data=[IMAGE], progress=messages.append
        )
    assert model.gru is gru
    assert model.conv2.out_channels == 6 and model.fc.in_features == 10
    assert model.conv1[0].out_channels == 4
    assert any(m.startswith("warning: structured:") and "GRU" in m for m in messages)


def test_classifier_output_layer_is_never_pruned() -> None:
    for name in CASES:
        before, model = fresh(name), pruned(name, ratio=0.9)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        first = [m for m in before.modules() if isinstance(m, nn.Linear)][-1]
        assert last.out_features == first.out_features


def test_targeting_the_output_layer_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'fc' writes the model's output"):
        slimkit.compress(fresh("residual"), structured(targets=["fc"]), data=[IMAGE])


def test_ignored_layers_are_not_changed() -> None:
    model = pruned("residual", ratio=0.5, ignore=["a2.0"])
    assert model.stem[0].out_channels == 8  # a2 writes into the stem's channels
    assert model.a1[0].out_channels == 8  # a2 reads these
    assert model.b1[0].out_channels == 4


def test_min_channels_and_ratio_zero() -> None:
    model = pruned("residual", ratio=0.9, min_channels=3)
    assert model.stem[0].out_channels == 3 and model.a1[0].out_channels == 3
    unchanged = pruned("residual", ratio=0.0)
    assert count_params(unchanged) == count_params(fresh("residual"))


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_range_is_a_config_error(ratio: float) -> None:
    with pytest.raises(ConfigError, match="ratio"):
        StructuredConfig(ratio=ratio)


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="criterion"):
        StructuredConfig(criterion="wanda")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min_channels"):
        StructuredConfig(min_channels=0)
    assert StructuredConfig.from_dict(StructuredConfig(ratio=0.3).to_dict()).ratio == 0.3


def test_untraceable_model_is_a_clear_error_and_ignore_helps() -> None:
    with pytest.raises(ModelError, match=r"`gt\(sum_1, 0\)` in module 'gate'.*ignore"):
        slimkit.compress(Untraceable().eval(), structured(), data=[IMAGE])
    with pytest.warns(UserWarning, match="'gate'"):
        model = slimkit.compress(Untraceable().eval(), structured(ignore=["gate"]), data=[IMAGE])
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 4


def test_needs_example_inputs() -> None:
    with pytest.raises(DataError, match="structured pruning"):
        slimkit.compress(fresh("residual"), structured())


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "taylor"])
def test_criteria_prune_the_toy_net(criterion: str) -> None:
    task = ToyTask()
    model = slimkit.compress(net(), structured(criterion=criterion, ratio=0.5), task=task)
    assert model.conv.out_channels == 4 and model.fc1.out_features == 8
    assert model(task.example_inputs()).shape == (1, 4)


def test_l1_removes_the_lowest_norm_channels() -> None:
    model = net()
    keep = model.conv.weight.detach().abs().sum(dim=(1, 2, 3)).argsort()[4:].sort().values
    expected = model.conv.weight.detach()[keep]
    slimkit.compress(model, structured(ratio=0.5), task=ToyTask())
    assert torch.equal(model.conv.weight.detach(), expected)


PRUNE_50 = {"name": "prune-50", "stages": [{"prune": {"method": "structured", "ratio": 0.5}}]}


def test_shipped_recipe() -> None:
    from slimkit.train.finetune import FinetuneConfig

    recipe = Recipe.from_file(shipped_dir() / "structured-50.yaml")
    assert recipe.stages == (
        StructuredConfig(ratio=0.5, criterion=Criterion.L1),
        FinetuneConfig(epochs=10, lr=0.001),
    )


@pytest.mark.slow
def test_structured_50_on_digits_resnet(tmp_path: Path) -> None:
    task = slimkit.tasks.get("digits-resnet")
    model, x = task.model(), task.example_inputs()
    before = count_params(model)
    with torch.no_grad():
        shape = model(x).shape
    slimkit.compress(model, PRUNE_50, task=task)
    after = count_params(model)
    assert 0.15 * before < after < 0.6 * before
    with torch.no_grad():
        assert model(x).shape == shape
    assert model.fc.out_features == 10
    slimkit.save(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(slimkit.load(tmp_path / "a")(x), model(x))


@pytest.mark.slow
def test_digits_resnet_zero_channels_are_removed_losslessly() -> None:
    task = slimkit.tasks.get("digits-resnet")
    model, x = task.model(), task.calibration_data()[0]
    zero_removed(model, task.example_inputs(), StructuredConfig(ratio=0.5))
    reference = copy.deepcopy(model)
    slimkit.compress(model, PRUNE_50, task=task)
    assert model.block2.conv2[0].groups == 4  # the grouped conv stays grouped
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_concatenated_branches_are_pruned_alike() -> None:
    # the two parts of a concatenation each keep the same share of their channels (ranked
    # within the part), as peers do; a residual sum is still ranked as one set
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 16, 3, padding=1)
            self.head = nn.Conv2d(24, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.a(x), self.b(x)], dim=1))

    torch.manual_seed(0)
    model = Cat().eval()
    with torch.no_grad():  # branch a: 2 strong channels and 6 weak ones; b: all alike
        model.a.weight[2:].mul_(1e-3)
    x = torch.randn(2, 3, 6, 6)
    slimkit.compress(
        model,
        {"name": "s", "stages": [{"prune": {"method": "structured", "ratio": 0.5}}]},
        data=[x],
    )
    assert (model.a.out_channels, model.b.out_channels) == (4, 8)
    assert model.head.in_channels == 12
