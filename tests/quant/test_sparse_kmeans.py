"""k-means on pruned layers: kept weights share a codebook, pruned ones stay exactly zero."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import slimkit
from slimkit.layers.codebook import SparseKMeansConv2d, SparseKMeansLinear
from tests.prune.toys import ToyTask, inputs, net

PRUNE = {"prune": {"method": "magnitude", "sparsity": 0.75}}


def recipe(*stages: dict) -> dict:
    return {"name": "t", "stages": list(stages)}


def test_kmeans_of_a_pruned_model_keeps_the_mask_and_round_trips(tmp_path: Path) -> None:
    pruned = slimkit.compress(net(), recipe(PRUNE))
    masks = {n: pruned.get_submodule(n).dense_weight() != 0 for n in ("conv", "fc1", "fc2")}
    shared = slimkit.compress(copy.deepcopy(pruned), recipe({"quantize": {"method": "kmeans"}}))
    assert isinstance(shared.conv, SparseKMeansConv2d) and isinstance(
        shared.fc1, SparseKMeansLinear
    )
    for name, keep in masks.items():
        w = shared.get_submodule(name).dense_weight()
        assert torch.equal(w != 0, keep), name
        assert w[keep].unique().numel() <= 16
        # each kept weight moves to its nearest shared value: at most half the largest gap
        before = pruned.get_submodule(name).dense_weight()[keep]
        assert float((w[keep] - before).abs().max()) <= float(before.abs().max())
    x = inputs(4)
    back = slimkit.load(slimkit.save(shared, tmp_path / "a"), model=net())
    with torch.no_grad():
        assert torch.equal(back(x), shared(x))
    path = slimkit.save(pruned, tmp_path / "p")
    assert (tmp_path / "a" / "model.safetensors").stat().st_size < (
        path / "model.safetensors"
    ).stat().st_size


def test_codebook_fine_tuning_keeps_pruned_weights_zero() -> None:
    task = ToyTask()
    stages = (PRUNE, {"quantize": {"method": "kmeans", "finetune_epochs": 2, "lr": 1e-2}})
    plain = slimkit.compress(net(), recipe(*stages[:1]))
    tuned = slimkit.compress(net(), recipe(*stages), task=task)
    for name in ("conv", "fc1", "fc2"):
        keep = plain.get_submodule(name).dense_weight() != 0
        w = tuned.get_submodule(name).dense_weight()
        assert bool((w[~keep] == 0).all()), name  # pruned weights stay exactly zero
        assert tuned.get_submodule(name).nnz == int(keep.sum())
    assert not any(isinstance(b, torch.nn.Parameter) for b in tuned.fc1.buffers())
