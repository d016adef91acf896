"""The fine-tuning learning-rate schedule: constant, or cosine decay over all the updates."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import slimkit
from slimkit.errors import ConfigError
from slimkit.train.finetune import FinetuneConfig, LRSchedule, lr_at
from tests.prune.toys import ToyTask, net


@given(lr=st.floats(1e-6, 1.0), total=st.integers(1, 10_000), data=st.data())
def test_cosine_decays_from_lr_towards_zero(lr: float, total: int, data: st.DataObject) -> None:
    step = data.draw(st.integers(0, total - 1))
    value = lr_at(lr, step, total, "cosine")
    assert 0.0 <= value <= lr
    assert lr_at(lr, 0, total, "cosine") == pytest.approx(lr)
    assert value >= lr_at(lr, step + 1, total, "cosine")  # never rises
    expected = lr * 0.5 * (1 + math.cos(math.pi * step / total))
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lr_at(lr, step, total, LRSchedule.CONSTANT) == lr


def test_cosine_reaches_half_way_at_the_middle() -> None:
    assert lr_at(0.1, 50, 100, "cosine") == pytest.approx(0.05)
    assert lr_at(0.1, 100, 100, "cosine") == pytest.approx(0.0, abs=1e-15)


def _trained(schedule: str) -> dict[str, torch.Tensor]:
    stage = {"method": "supervised", "epochs": 3, "lr": 0.01, "lr_schedule": schedule}
    model = slimkit.compress(net(), {"name": "f", "stages": [{"finetune": stage}]}, task=ToyTask())
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_schedule_changes_the_training_and_stays_deterministic() -> None:
    cosine, constant = _trained("cosine"), _trained("constant")
    assert any(not torch.equal(cosine[k], constant[k]) for k in cosine)
    again = _trained("cosine")
    assert all(torch.equal(cosine[k], again[k]) for k in cosine)


def test_unknown_schedule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="lr_schedule"):
        FinetuneConfig(lr_schedule="linear")  # type: ignore[arg-type]
