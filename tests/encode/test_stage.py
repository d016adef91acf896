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
    assert coded.fc1.bits_per_weight() < 4.0
    assert "Huffman" in coded.fc1.describe()


def test_stream_decoded_again_after_it_changes() -> None:
    coded = slimkit.compress(net(), recipe(QUANT_STAGES["rtn-4"], {"encode": {}}))
    layer = coded.fc2
    with torch.no_grad():
        before = layer(torch.ones(1, 64))
        layer.inner.qweight.zero_()  # stale codes are rebuilt from the stream on change
        layer.code_bits.add_(0)
        assert torch.equal(layer(torch.ones(1, 64)), before)


def test_encode_needs_layers_with_codes() -> None:
    with pytest.raises(SlimkitError, match="match"):
        slimkit.compress(net(), recipe({"encode": {"method": "huffman"}}))
