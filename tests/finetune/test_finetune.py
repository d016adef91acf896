"""The finetune stage: whole-model supervised training that keeps every layer's stored form."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.context import Context
from slimkit.errors import ConfigError, DataError
from slimkit.formats.bitmask import unpack_mask
from slimkit.layers.codebook import KMeansLinear
from slimkit.layers.quantized import QuantLinear
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.recipe import Recipe
from slimkit.train.finetune import FinetuneConfig, apply_finetune, trainable
from tests.prune.toys import ToyTask, inputs, net, prune_recipe

FAST = {"epochs": 5, "lr": 0.01}


def finetuned(model: nn.Module, task: ToyTask | None = None, **options: object) -> nn.Module:
    stage = {"finetune": {"method": "supervised", **FAST, **options}}
    return slimkit.compress(model, {"name": "f", "stages": [stage]}, task=task or ToyTask())


def train_loss(model: nn.Module, task: ToyTask) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in task.batches) / 3


def pruned(sparsity: float = 0.7) -> nn.Module:
    return slimkit.compress(net(), prune_recipe("magnitude", sparsity=sparsity))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_on_the_training_data_decreases() -> None:
    task = ToyTask()
    model = net()
    before = train_loss(model, task)
    finetuned(model, task)
    assert train_loss(model, task) < before - 0.1
    assert not model.training


def test_sparsity_pattern_is_kept_and_pruned_weights_stay_zero() -> None:
    model = pruned()
    ref = copy.deepcopy(model)
    task = ToyTask()
    before = train_loss(model, task)
    finetuned(model, task)
    assert train_loss(model, task) < before
    for name in ("conv", "fc1", "fc2"):
        layer, old = model.get_submodule(name), ref.get_submodule(name)
        assert type(layer) is type(old) and type(layer) in (SparseLinear, SparseConv2d)
        assert torch.equal(layer.mask, old.mask)
        assert layer.values.shape == old.values.shape and "values" in layer._buffers
        assert not torch.equal(layer.values, old.values)
        keep = unpack_mask(layer.mask, layer.dense_weight().numel())
        dense = layer.dense_weight().reshape(-1)
        assert bool((dense[~keep] == 0).all())
        assert torch.equal(dense[keep], layer.values)
        assert not layer.dense_weight().requires_grad
        assert not torch.equal(layer.bias, old.bias)
    assert model.state_dict().keys() == ref.state_dict().keys()


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = finetuned(pruned())
    slimkit.save(model, tmp_path / "a")
    back = slimkit.load(tmp_path / "a", model=net(seed=9))
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = inputs()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_no_labelled_data_raises_before_the_model_changes() -> None:
    model = pruned()
    before = snapshot(model)
    with pytest.raises(DataError, match="finetune needs labelled training data"):
        finetuned(model, ToyTask(labelled=False))
    with pytest.raises(DataError):
        apply_finetune(model, FinetuneConfig(), Context(names=[]))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_quantized_layers_stay_frozen_and_kmeans_codebooks_train() -> None:
    recipe = {
        "name": "q",
        "stages": [
            {"quantize": {"method": "rtn", "bits": 4, "targets": ["fc2"]}},
            {"quantize": {"method": "kmeans", "bits": 3, "targets": ["fc1"]}},
        ],
    }
    model = slimkit.compress(net(), recipe)
    assert type(model.fc2) is QuantLinear and type(model.fc1) is KMeansLinear
    before = snapshot(model)
    finetuned(model)
    after = model.state_dict()
    for key in ("fc2.qweight", "fc2.scale", "fc2.bias", "fc1.indices"):
        assert torch.equal(after[key], before[key]), key
    for key in ("fc1.codebook", "fc1.bias", "conv.weight"):
        assert not torch.equal(after[key], before[key]), key
    assert "codebook" in model.fc1._buffers


def test_trainable_skips_integer_code_layers() -> None:
    recipe = {
        "name": "pq",
        "stages": [
            {"prune": {"method": "magnitude", "targets": ["conv", "fc1"]}},
            {"quantize": {"targets": ["fc2"]}},
        ],
    }
    model = slimkit.compress(net(), recipe)
    found = trainable(model)
    ids = {id(p) for p in found.params}
    assert id(model.fc2.bias) not in ids
    assert id(model.conv.bias) in ids and id(model.fc1.bias) in ids
    assert found.sparse == [model.conv, model.fc1] and found.kmeans == []


def test_deterministic_under_the_seed_and_flags_restored() -> None:
    a, b = finetuned(pruned(), seed=3), finetuned(pruned(), seed=3)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    plain = net()
    plain.fc1.weight.requires_grad_(False)
    finetuned(plain)
    assert not plain.fc1.weight.requires_grad and plain.fc2.weight.requires_grad
    assert all(p.grad is None for p in plain.parameters())


def test_batch_limit_uses_the_first_batches() -> None:
    reports: list[str] = []
    stage = {"finetune": {"method": "supervised", "epochs": 1, "batch_limit": 2}}
    slimkit.compress(
        net(), {"name": "f", "stages": [stage]}, task=ToyTask(), progress=reports.append
    )
    assert any("on 2 batches" in r for r in reports)


@pytest.mark.parametrize(
    "options",
    [{"epochs": 0}, {"lr": 0.0}, {"lr": float("inf")}, {"batch_limit": 0}, {"seed": -1}],
)
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=f"finetune.supervised.{next(iter(options))}"):
        FinetuneConfig(**options)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="optimizer"):
        FinetuneConfig(optimizer="sgd")  # type: ignore[arg-type]


def test_recipe_round_trip() -> None:
    r = Recipe.from_dict({"name": "f", "stages": [{"finetune": {"method": "supervised"}}]})
    assert r.stages == (FinetuneConfig(),)
    assert FinetuneConfig(epochs=3, lr=1e-4, seed=0).to_dict()["optimizer"] == "adam"
    assert Recipe.from_dict(r.to_dict()) == r


def test_huffman_coded_layers_stay_frozen() -> None:
    recipe = {
        "name": "ke",
        "stages": [
            {"quantize": {"method": "kmeans", "bits": 3, "targets": ["fc1"]}},
            {"encode": {"method": "huffman", "targets": ["fc1"]}},
        ],
    }
    model = slimkit.compress(net(), recipe)
    before = snapshot(model)
    finetuned(model)
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert not any(k.startswith("fc1.") for k in changed)
    assert {"conv.weight", "fc2.weight"} <= changed
