from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from slimkit.evaluate.latency import leading_dim, rotation, time_alternating


class Recorder(nn.Module):
    """Appends its tag to a shared log at each call."""

    def __init__(self, tag: int, log: list[int], sleep_s: float = 0.0) -> None:
        super().__init__()
        self.tag, self.log, self.sleep_s = tag, log, sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.tag)
        assert torch.is_inference_mode_enabled()
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return x


def test_rounds_alternate_in_rotating_order() -> None:
    log: list[int] = []
    models = [Recorder(i, log) for i in range(3)]
    time_alternating(models, torch.zeros(5, 2), runs=3, warmup=2)
    rounds = [log[i : i + 3] for i in range(0, len(log), 3)]
    assert rounds == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2], [1, 2, 0]]


def test_runs_and_warmup_counts_are_respected() -> None:
    log: list[int] = []
    stats = time_alternating([Recorder(0, log), Recorder(1, log)], torch.zeros(1), runs=7, warmup=3)
    assert log.count(0) == log.count(1) == 10
    assert [s["runs"] for s in stats] == [7, 7]


def test_summary_fields_and_ordering() -> None:
    log: list[int] = []
    slow = Recorder(1, log, sleep_s=0.004)
    stats = time_alternating([Recorder(0, log), slow], torch.zeros(6, 3), runs=5, warmup=1)
    for s in stats:
        assert set(s) == {"median", "min", "max", "batch", "threads", "runs"}
        assert s["min"] <= s["median"] <= s["max"]
        assert s["batch"] == 6
        assert s["threads"] == torch.get_num_threads()
    assert stats[1]["min"] >= 4.0  # ms
    assert stats[1]["median"] > stats[0]["median"]


def test_threads_are_set_then_restored() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x

    stats = time_alternating([Probe()], torch.zeros(1), runs=2, warmup=0, threads=1)
    assert seen == [1, 1]
    assert stats[0]["threads"] == 1
    assert torch.get_num_threads() == before


def test_bad_runs_are_refused() -> None:
    with pytest.raises(ValueError, match="runs"):
        time_alternating([nn.Identity()], torch.zeros(1), runs=0)


def test_leading_dim_of_each_input_form() -> None:
    assert leading_dim(torch.zeros(4, 2)) == 4
    assert leading_dim((torch.zeros(3, 1), torch.zeros(9))) == 3
    assert leading_dim({"input_ids": torch.zeros(2, 7)}) == 2
    assert rotation(3, 4) == [1, 2, 0]
