"""Attention-head and FFN-neuron pruning (prune/transformer.py) on a tiny BertModel."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit import pipeline
from slimkit.compressed import count_params
from slimkit.errors import ConfigError, DataError, ModelError
from slimkit.prune.transformer import (
    HeadsCriterion,
    HeadsFFNConfig,
    bias_shift,
    column_scores,
    find_attention,
    find_ffn,
    head_columns,
    head_scores,
    keep_highest,
)
from slimkit.recipe import Recipe, shipped_dir
from tests.prune.toys import prune_recipe

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, LAYERS, FFN = 32, 4, 2, 64
HEAD_SIZE = HIDDEN // HEADS


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (4, 12), generator=gen)  # (B, T)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state  # type: ignore[no-any-return]


def recipe(**options: Any) -> dict[str, Any]:
    return prune_recipe("heads-ffn", **options)


def layer(model: nn.Module, i: int) -> Any:
    return model.encoder.layer[i]  # type: ignore[index, union-attr]


# -- pure math ---------------------------------------------------------------------------
def test_head_columns_and_scores() -> None:
    assert head_columns(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    cols = column_scores(torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([[3.0, 0, 1, 1]]))
    assert cols.tolist() == [3.0, 0.0, 0.0, 1.0]
    assert head_scores(cols, 2).tolist() == [3.0, 1.0]
    assert keep_highest(torch.tensor([0.5, 0.1, 0.9, 0.1]), 2).tolist() == [0, 2]


def test_bias_shift_sums_removed_columns() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    shift = bias_shift(w, torch.tensor([1.0, 10.0, 100.0]), kept=torch.tensor([1]))
    assert shift.tolist() == [301.0, 604.0]


def test_config_round_trip_and_defaults() -> None:
    c = HeadsFFNConfig()
    assert (c.heads, c.ffn_ratio, c.criterion) == (2, 0.3, HeadsCriterion.ACTIVATION)
    assert not c.compensate
    assert HeadsFFNConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "options", [{"ffn_ratio": 1.0}, {"ffn_ratio": -0.1}, {"heads": -1}, {"criterion": "l1"}]
)
def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(options))):
        HeadsFFNConfig(**options)


def test_too_many_heads_is_config_error_before_work() -> None:
    model = bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"heads.*at most 3"):
        slimkit.compress(model, recipe(heads=HEADS), data=batches())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- finding layers ----------------------------------------------------------------------
def test_finds_bert_layers() -> None:
    attention, ffn = find_attention(bert()), find_ffn(bert())
    assert [s.name for s in attention] == [f"encoder.layer.{i}.attention.self" for i in (0, 1)]
    assert [s.out for s in attention] == [
        f"encoder.layer.{i}.attention.output.dense" for i in (0, 1)
    ]
    assert [(s.up, s.down) for s in ffn] == [
        (f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense") for i in (0, 1)
    ]


def test_too_many_heads_fails_in_the_precheck() -> None:
    with pytest.raises(ConfigError, match=r"stages\[0\]\.prune: .*heads.*at most 3"):
        pipeline.precheck(bert(), Recipe.from_dict(recipe(heads=HEADS)))


def test_model_without_attention_is_model_error() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ModelError, match="no BERT-like attention layer"):
        slimkit.compress(model, recipe(criterion="magnitude"))


# -- pruning -----------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["activation", "magnitude"])
def test_shapes_attributes_and_param_count(criterion: str) -> None:
    model, data = bert(), batches()
    shape, params = hidden(model, data[0]).shape, count_params(model)
    slimkit.compress(model, recipe(heads=1, ffn_ratio=0.25, criterion=criterion), data=data)
    assert hidden(model, data[0]).shape == shape
    h, n = HEAD_SIZE, 16  # one head of 8 dims, 25% of 64 neurons
    per_layer = 3 * h * (HIDDEN + 1) + h * HIDDEN + n * (HIDDEN + 1) + n * HIDDEN
    assert count_params(model) == params - LAYERS * per_layer
    for i in range(LAYERS):
        attn = layer(model, i).attention
        assert (attn.self.num_attention_heads, attn.self.all_head_size) == (3, 24)
        assert attn.self.attention_head_size == HEAD_SIZE
        assert type(attn.self.query) is nn.Linear and attn.self.query.out_features == 24
        assert attn.output.dense.in_features == 24
        assert layer(model, i).intermediate.dense.out_features == 48


def zero_head_and_neurons(model: nn.Module, head: int, neurons: slice) -> None:
    cols = slice(head * HEAD_SIZE, (head + 1) * HEAD_SIZE)
    with torch.no_grad():
        for i in range(LAYERS):
            attn, block = layer(model, i).attention, layer(model, i)
            for proj in (attn.self.query, attn.self.key, attn.self.value):
                proj.weight[cols] = 0
                proj.bias[cols] = 0
            attn.output.dense.weight[:, cols] = 0
            block.intermediate.dense.weight[neurons] = 0
            block.intermediate.dense.bias[neurons] = 0
            block.output.dense.weight[:, neurons] = 0


@pytest.mark.parametrize("criterion", ["activation", "magnitude"])
def test_removing_zeroed_head_and_neurons_is_lossless(criterion: str) -> None:
    model, data = bert(), batches()
    zero_head_and_neurons(model, head=2, neurons=slice(8, 24))
    reference = [hidden(model, b) for b in data]
    slimkit.compress(model, recipe(heads=1, ffn_ratio=0.25, criterion=criterion), data=data)
    assert layer(model, 0).attention.self.num_attention_heads == 3
    for b, ref in zip(data, reference, strict=True):
        torch.testing.assert_close(hidden(model, b), ref, atol=1e-5, rtol=0)


def constant_head_and_neurons(model: nn.Module, head: int, neurons: slice) -> None:
    """Zero the value rows of ``head`` (its output is then its value bias at every token)
    and the input rows of ``neurons`` (each then outputs gelu of its bias)."""
    cols = slice(head * HEAD_SIZE, (head + 1) * HEAD_SIZE)
    with torch.no_grad():
        for i in range(LAYERS):
            layer(model, i).attention.self.value.weight[cols] = 0
            layer(model, i).intermediate.dense.weight[neurons] = 0
            layer(model, i).intermediate.dense.bias[neurons] = 1.0


@pytest.mark.parametrize("compensate", [True, False])
def test_compensation_removes_constant_head_and_neurons_losslessly(compensate: bool) -> None:
    model, data = bert(), batches()
    constant_head_and_neurons(model, head=1, neurons=slice(0, 16))
    reference = [hidden(model, b) for b in data]
    options = {"heads": 1, "ffn_ratio": 0.25, "criterion": "magnitude", "compensate": compensate}
    slimkit.compress(model, recipe(**options), data=data)
    pairs = zip(data, reference, strict=True)
    errors = [float((hidden(model, b) - ref).abs().max()) for b, ref in pairs]
    assert (max(errors) < 1e-5) == compensate


def test_targets_limit_the_layers_pruned() -> None:
    model = bert()
    slimkit.compress(model, recipe(heads=1, targets=["encoder.layer.0.*"]), data=batches())
    assert layer(model, 0).attention.self.num_attention_heads == 3
    assert layer(model, 1).attention.self.num_attention_heads == HEADS
    assert layer(model, 1).intermediate.dense.out_features == FFN


def test_activation_needs_data_magnitude_does_not() -> None:
    with pytest.raises(DataError, match="calibration data"):
        slimkit.compress(bert(), recipe())
    model = slimkit.compress(bert(), recipe(criterion="magnitude"))
    assert layer(model, 0).attention.self.num_attention_heads == HEADS - 2


def test_save_load_round_trip_exact(tmp_path: Path) -> None:
    model, data = bert(), batches()
    slimkit.compress(model, recipe(heads=2, ffn_ratio=0.3), data=data)
    slimkit.save(model, tmp_path / "art")
    loaded = slimkit.load(tmp_path / "art", model=bert(seed=7))
    for b in data:
        assert torch.equal(hidden(loaded, b), hidden(model, b))
    for i in range(LAYERS):
        attn = layer(loaded, i).attention.self
        assert (attn.num_attention_heads, attn.all_head_size) == (2, 16)
    assert count_params(loaded) == count_params(model)


def test_shipped_recipe() -> None:
    r = Recipe.from_file(shipped_dir() / "heads-ffn.yaml")
    expected = HeadsFFNConfig(heads=2, ffn_ratio=0.3, criterion=HeadsCriterion.ACTIVATION)
    assert r.stages == (dataclasses.replace(expected, compensate=True),)
    model = slimkit.compress(bert(), shipped_dir() / "heads-ffn.yaml", data=batches())
    assert layer(model, 1).intermediate.dense.out_features == FFN - round(0.3 * FFN)
