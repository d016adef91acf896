"""bf16 weights: half the bytes, the bf16 kernel where the CPU has it, fp32 elsewhere."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.formats import bf16 as bf16_format
from slimkit.layers.weight import FormatConv2d, FormatEmbedding, FormatLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(16, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)  # (B, T, 16)
        h = self.conv(h.unsqueeze(1)).mean(1)  # (B, T, 16)
        return self.fc(h)


def bf16_net() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = Net().eval()
    return net, slimkit.compress(copy.deepcopy(net), "bf16")


def reference(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The float model with every weight rounded to bf16, computed in fp32."""
    with torch.no_grad():
        for m in (net.emb, net.conv, net.fc):
            m.weight.copy_(m.weight.to(torch.bfloat16).float())
        return net(idx)


IDX = torch.randint(0, 20, (3, 5))


def test_fp32_kernel_without_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bf16_format, "has_bf16", lambda: False)
    net, q = bf16_net()
    types = {type(q.emb), type(q.conv), type(q.fc)}
    assert types == {FormatEmbedding, FormatConv2d, FormatLinear}
    assert q.fc.kernel_weight().dtype == torch.float32
    assert torch.equal(q(IDX), reference(net, IDX))


def test_bf16_kernel_with_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bf16_format, "has_bf16", lambda: True)
    net, q = bf16_net()
    assert q.fc.kernel_weight().dtype == torch.bfloat16
    assert q.fc.kernel_weight().data_ptr() == q.fc.weight.data_ptr()  # the stored tensor
    out = q(IDX)
    assert out.dtype == torch.float32
    want = reference(net, IDX)
    # bf16 activations: each product rounded to 8 significant bits
    assert float((out - want).abs().max()) <= 0.02 * float(want.abs().max())


def test_bf16_halves_the_bytes_and_reloads_bit_exactly(tmp_path: Path) -> None:
    _, q = bf16_net()
    assert q.fc.weight.dtype == torch.bfloat16
    slimkit.save(q, tmp_path / "a")
    back = slimkit.load(tmp_path / "a", model=Net().eval())
    assert torch.equal(back.fc.weight, q.fc.weight)
    assert torch.equal(back(IDX), q(IDX))
    assert F.cosine_similarity(back(IDX).flatten(), q(IDX).flatten(), dim=0) > 0.9999
