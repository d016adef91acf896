from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.evaluate.memory import forward_allocation_peak, peak_forward_bytes, resident_bytes


def test_peak_covers_the_known_intermediate() -> None:
    model = nn.Linear(256, 4096).eval()
    x = torch.randn(512, 256)
    output_bytes = 512 * 4096 * 4
    peak = forward_allocation_peak(model, x)
    assert output_bytes <= peak < 1.5 * output_bytes


def test_two_live_intermediates_double_the_peak() -> None:
    model = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 4)).eval()
    x = torch.randn(512, 256)
    one = 512 * 2048 * 4
    assert 2 * one <= forward_allocation_peak(model, x) < 2.5 * one


def test_total_is_resident_plus_peak() -> None:
    model = nn.Linear(256, 4096).eval()
    x = torch.randn(512, 256)
    resident = (256 * 4096 + 4096) * 4
    assert resident_bytes(model) == resident
    total = peak_forward_bytes(model, x)
    assert resident + 512 * 4096 * 4 <= total < resident + 1.5 * 512 * 4096 * 4


def test_resident_counts_buffers_by_dtype_and_shared_tensors_once() -> None:
    model = nn.Module()
    model.register_buffer("q", torch.zeros(100, dtype=torch.int8))
    shared = nn.Linear(10, 10, bias=False)
    model.a, model.b = shared, shared
    assert resident_bytes(model) == 100 + 10 * 10 * 4


def test_profiler_messages_do_not_reach_the_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    forward_allocation_peak(nn.Linear(4, 4), torch.randn(2, 4))
    out, err = capfd.readouterr()
    assert "profiler_start" not in out + err
    assert "profiler_stop" not in out + err
