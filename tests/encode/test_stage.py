"""The encode stage: Huffman-coded codes compute the same, round-trip, and shrink the file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit
from slimkit.compressed import count_params
from slimkit.encode.stage import HuffmanCoded
from slimkit.errors import SlimkitError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # peaked weights, as after training: codes near zero dominate
        for p in model.parameters():
            p.copy_(torch.randn_like(p).pow(3) * 0.05)
    return model.eval()


X = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))

PRUNE_90 = {"prune": {"method": "magnitude", "sparsity": 0.9}}
QUANT_STAGES = {
    "kmeans-4": {"quantize": {"method": "kmeans", "bits": 4, "finetune_epochs": 0}},
    "rtn-4": {"quantize": {"method": "rtn", "bits": 4, "granularity": "per_channel"}},
    "rtn-8": {"quantize": {"method": "rtn", "bits": 8}},
}


def recipe(*stages: dict) -> dict:
    return {"name": "t", "stages": list(stages)}


@pytest.mark.parametrize("quant", list(QUANT_STAGES))
def test_encoded_layers_compute_the_same_and_round_trip(quant: str, tmp_path: Path) -> None:
    plain = slimkit.compress(net(), recipe(QUANT_STAGES[quant]))
    coded = slimkit.compress(copy.deepcopy(plain), recipe({"encode": {"method": "huffman"}}))
    assert all(isinstance(getattr(coded, n), HuffmanCoded) for n in ("conv", "fc1", "fc2"))
    with torch.no_grad():
        y = plain(X)
        assert torch.equal(coded(X), y)
    assert count_params(coded) == count_params(plain)
    back = slimkit.load(slimkit.save(coded, tmp_path / "a"), model=Net())
    assert isinstance(back.fc1, HuffmanCoded)
    with torch.no_grad():
        assert torch.equal(back(X), y)
    for key, value in coded.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_codes_are_not_saved_twice_and_the_file_shrinks(tmp_path: Path) -> None:
    stage = QUANT_STAGES["kmeans-4"]
    plain = slimkit.compress(net(), recipe(stage))
    coded = slimkit.compress(net(), recipe(stage, {"encode": {}}))  # huffman by default
    assert not any(k.endswith("inner.indices") for k in coded.state_dict())
    sizes = {}
    for name, model in (("plain", plain), ("coded", coded)):
        path = slimkit.save(model, tmp_path / name)
        sizes[name] = (path / "model.safetensors").stat().st_size
    assert sizes["coded"] < sizes["plain"]
    assert coded.fc1.bits_per_symbol()[0] < 4.0
    assert "Huffman" in coded.fc1.describe()


def test_stream_decoded_again_after_it_changes() -> None:
    coded = slimkit.compress(net(), recipe(QUANT_STAGES["rtn-4"], {"encode": {}}))
    layer = coded.fc2
    with torch.no_grad():
        before = layer(torch.ones(1, 64))
        layer.inner.qweight.zero_()  # stale codes are rebuilt from the stream on change
        layer.payload.add_(0)
        assert torch.equal(layer(torch.ones(1, 64)), before)


def test_encode_needs_layers_with_codes() -> None:
    with pytest.raises(SlimkitError, match="match"):
        slimkit.compress(net(), recipe({"encode": {"method": "huffman"}}))


def test_sparse_masks_are_coded_and_shrink_the_file(tmp_path: Path) -> None:
    plain = slimkit.compress(net(), recipe(PRUNE_90))
    coded = slimkit.compress(net(), recipe(PRUNE_90, {"encode": {}}))
    with torch.no_grad():
        assert torch.equal(coded(X), plain(X))
    sizes = {}
    for name, model in (("plain", plain), ("coded", coded)):
        path = slimkit.save(model, tmp_path / name)
        sizes[name] = (path / "model.safetensors").stat().st_size
    assert sizes["coded"] < sizes["plain"]
    assert coded.fc1.bits_per_symbol()[0] < 8.0  # mask bytes, mostly zero at 10% density
    back = slimkit.load(tmp_path / "coded", model=Net())
    with torch.no_grad():
        assert torch.equal(back(X), plain(X))


def test_deep_compression_prune_share_encode_round_trip(tmp_path: Path) -> None:
    from slimkit.layers.codebook import SparseKMeansLinear

    pruned = slimkit.compress(net(), recipe(PRUNE_90))
    kept = pruned.fc1.dense_weight() != 0
    shared = slimkit.compress(copy.deepcopy(pruned), recipe(QUANT_STAGES["kmeans-4"]))
    assert isinstance(shared.fc1, SparseKMeansLinear)
    w = shared.fc1.dense_weight()
    assert torch.equal(w != 0, kept)  # same mask, pruned weights exactly zero
    assert w[kept].unique().numel() <= 16
    assert count_params(shared) == count_params(pruned)
    coded = slimkit.compress(copy.deepcopy(shared), recipe({"encode": {}}))
    with torch.no_grad():
        y = shared(X)
        assert torch.equal(coded(X), y)
    back = slimkit.load(slimkit.save(coded, tmp_path / "dc"), model=Net())
    with torch.no_grad():
        assert torch.equal(back(X), y)
    assert len(coded.fc1.bits_per_symbol()) == 2  # indices and mask


def test_payload_layout_round_trip() -> None:
    from slimkit.encode import huffman
    from slimkit.encode.stage import pack_payload, stream_layout, unpack_payload

    gen = torch.Generator().manual_seed(0)
    streams = [
        huffman.encode(torch.randint(0, 16, (9000,), generator=gen, dtype=torch.uint8)),
        huffman.encode(torch.zeros(0, dtype=torch.uint8)),
        huffman.encode(torch.randint(0, 256, (100,), generator=gen, dtype=torch.uint8)),
    ]
    layouts = [stream_layout(c) for c in streams]
    assert layouts[0]["n_symbols"] <= 16 and layouts[0]["n_chunks"] == 3
    back = unpack_payload(pack_payload(streams), layouts)
    for a, b in zip(streams, back, strict=True):
        assert torch.equal(huffman.decode(a), huffman.decode(b))
    with pytest.raises(ValueError, match="layout"):
        unpack_payload(pack_payload(streams)[:-1], layouts)
