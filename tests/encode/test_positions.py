"""Kept positions as gap symbols, and the encode stage's payload options (gaps vs mask bytes,
the wrapped layer's tensors in the payload, float16)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimkit
from slimkit.compressed import count_params
from slimkit.encode import huffman
from slimkit.encode.positions import ESCAPE, gaps_from_mask, mask_from_gaps
from slimkit.encode.stage import HuffmanCoded
from slimkit.errors import ConfigError
from slimkit.formats.bitmask import pack_mask, unpack_mask

from .test_stage import PRUNE_90, QUANT_STAGES, Net, X, net, recipe


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 3000),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_gaps_round_trip_any_mask(numel: int, density: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(numel, generator=gen) < density
    mask = pack_mask(keep)
    symbols = gaps_from_mask(mask, numel)
    assert symbols.dtype == torch.uint8
    # one non-escape symbol per kept weight, escapes only for gaps of 255 or more
    assert int((symbols != ESCAPE).sum()) == int(keep.sum())
    assert torch.equal(unpack_mask(mask_from_gaps(symbols, numel), numel), keep)


def test_long_gaps_use_escapes() -> None:
    keep = torch.zeros(1000, dtype=torch.bool)
    keep[[0, 600, 999]] = True  # gaps 0, 599 = 2 * 255 + 89, 398 = 255 + 143
    symbols = gaps_from_mask(pack_mask(keep), 1000).tolist()
    assert symbols == [0, ESCAPE, ESCAPE, 89, ESCAPE, 143]


def test_gaps_pointing_past_the_end_are_an_error() -> None:
    with pytest.raises(ValueError, match="position 10 of 10"):
        mask_from_gaps(torch.tensor([10], dtype=torch.uint8), 10)


@pytest.mark.parametrize(
    ("density", "gap_bound", "byte_floor"), [(0.02, 1.12, 1.3), (0.05, 1.08, 1.07)]
)
def test_gaps_cost_less_than_mask_bytes_at_high_sparsity(
    density: float, gap_bound: float, byte_floor: float
) -> None:
    """The gap code stays within a few percent of the positions' entropy; mask bytes fall
    behind as the density falls (a mostly-zero byte still takes a whole code word)."""
    n, p = 200_000, density
    keep = torch.rand(n, generator=torch.Generator().manual_seed(0)) < p
    mask = pack_mask(keep)
    entropy_bits = n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    gap_bits = 8 * huffman.encode(gaps_from_mask(mask, n)).nbytes()
    byte_bits = 8 * huffman.encode(mask).nbytes()
    assert gap_bits < gap_bound * entropy_bits
    assert byte_bits > byte_floor * entropy_bits
    assert gap_bits < byte_bits


def _saved_bytes(model: torch.nn.Module, path: Path) -> int:
    return (slimkit.save(model, path) / "model.safetensors").stat().st_size


def test_one_tensor_per_layer_and_exact_with_float32(tmp_path: Path) -> None:
    shared = slimkit.compress(net(), recipe(PRUNE_90, QUANT_STAGES["kmeans-4"]))
    coded = slimkit.compress(copy.deepcopy(shared), recipe({"encode": {}}))
    assert sorted(coded.state_dict()) == ["conv.payload", "fc1.payload", "fc2.payload"]
    assert count_params(coded) == count_params(shared)
    assert "float32" in coded.fc1.describe()
    with torch.no_grad():
        y = shared(X)
        assert torch.equal(coded(X), y)
    back = slimkit.load(slimkit.save(coded, tmp_path / "a"), model=Net())
    with torch.no_grad():
        assert torch.equal(back(X), y)


def test_float16_halves_the_floats_and_loads_what_was_evaluated(tmp_path: Path) -> None:
    stages = (PRUNE_90, QUANT_STAGES["kmeans-4"])
    f32 = slimkit.compress(net(), recipe(*stages, {"encode": {"floats": "float32"}}))
    f16 = slimkit.compress(net(), recipe(*stages, {"encode": {"floats": "float16"}}))
    biases = sum(getattr(f32, n).inner.bias.numel() for n in ("conv", "fc1", "fc2"))
    codebooks = 3 * 16
    saved = f32.fc1.payload.numel() + f32.fc2.payload.numel() + f32.conv.payload.numel()
    saved16 = f16.fc1.payload.numel() + f16.fc2.payload.numel() + f16.conv.payload.numel()
    assert saved - saved16 == 2 * (biases + codebooks)
    bias16 = f16.fc1.inner.bias
    assert torch.equal(bias16, f32.fc1.inner.bias.half().float())  # rounded, in place
    with torch.no_grad():
        y = f16(X)
    back = slimkit.load(slimkit.save(f16, tmp_path / "h"), model=Net())
    with torch.no_grad():
        assert torch.equal(back(X), y)  # the loaded model is the one the stage returned


def test_gaps_smaller_than_bytes_on_a_pruned_layer(tmp_path: Path) -> None:
    gaps = slimkit.compress(net(), recipe(PRUNE_90, {"encode": {"positions": "gaps"}}))
    raw = slimkit.compress(net(), recipe(PRUNE_90, {"encode": {"positions": "bytes"}}))
    assert gaps.fc1.positions == "gaps" and raw.fc1.positions == "bytes"
    with torch.no_grad():
        assert torch.equal(gaps(X), raw(X))
    assert gaps.fc1.payload.numel() < raw.fc1.payload.numel()
    back = slimkit.load(slimkit.save(raw, tmp_path / "b"), model=Net())
    with torch.no_grad():
        assert torch.equal(back(X), raw(X))


def test_older_layout_without_floats_still_loads(tmp_path: Path) -> None:
    """A layer coded before the payload held the wrapped layer's tensors (no ``floats`` in
    its spec, mask bytes) keeps them in the wrapped layer and still round-trips."""
    pruned = slimkit.compress(net(), recipe(PRUNE_90))
    old = HuffmanCoded.wrap(pruned.fc1, positions="bytes", floats=None)
    assert "floats" not in old.spec() and old.spec()["positions"] == "bytes"
    assert {"payload", "inner.values", "inner.bias"} <= set(old.state_dict())
    rebuilt = HuffmanCoded.from_spec(old.spec())
    rebuilt.load_state_dict(old.state_dict())
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned.fc1(x))


@pytest.mark.parametrize(("key", "value"), [("floats", "float8"), ("positions", "runs")])
def test_bad_encode_options_are_config_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=value):
        slimkit.compress(net(), recipe(PRUNE_90, {"encode": {key: value}}))
