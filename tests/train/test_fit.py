"""The one training loop: minimisation, early stopping, checkpoint + resume, events, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.errors import ModelError
from slimkit.train.checkpoint import SafetensorsCheckpoint
from slimkit.train.fit import Callback, EarlyStopping, FitResult, fit, minibatches, shuffled
from slimkit.train.optim import adam, torch_optimizer

TARGET = torch.tensor([1.0, -2.0, 0.5])


def quadratic(x: torch.Tensor) -> Callable[[Any], torch.Tensor]:
    return lambda _batch: ((x - TARGET) ** 2).sum()


class Recorder(Callback):
    """Every event as a string, and the model's state at the end of each epoch."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.events: list[str] = []
        self.model = model
        self.states: list[dict[str, torch.Tensor]] = []

    def epoch_start(self, epoch: int) -> None:
        self.events.append(f"start {epoch}")

    def step_end(self, steps: int, loss: float) -> None:
        self.events.append(f"step {steps}")

    def epoch_end(self, epoch: int, result: FitResult) -> None:
        self.events.append(f"end {epoch}")
        if self.model is not None:
            self.states.append({k: v.clone() for k, v in self.model.state_dict().items()})


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).eval()


def regression(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 3, generator=g), torch.randn(5, 1, generator=g)) for _ in range(n)]


def mse(model: nn.Module) -> Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    return lambda batch: nn.functional.mse_loss(model(batch[0]), batch[1])


# -- minimisation ------------------------------------------------------------------------
def test_fit_minimises_a_quadratic() -> None:
    x = torch.zeros(3, requires_grad=True)
    result = fit([x], [0] * 10, quadratic(x), epochs=20, optimizer=adam(0.1))
    assert result.epochs_run == 20 and result.losses[-1] < 0.01 < result.losses[0]
    assert torch.allclose(x, TARGET, atol=0.1) and x.grad is None


def test_schedule_sets_the_rate_before_each_update() -> None:
    x = torch.zeros(3, requires_grad=True)
    seen: list[int] = []

    def schedule(step: int) -> float:
        seen.append(step)
        return 0.0 if step >= 2 else 0.1

    fit([x], [0, 1], quadratic(x), epochs=3, optimizer=adam(1.0), schedule=schedule)
    assert seen == [0, 1, 2, 3, 4, 5]
    two = torch.zeros(3, requires_grad=True)  # two updates at 0.1; those at rate 0 move nothing
    fit([two], [0, 1], quadratic(two), epochs=1, optimizer=adam(0.1))
    assert torch.equal(x, two)


def test_batch_helpers() -> None:
    g = torch.Generator().manual_seed(0)
    epoch = minibatches(10, 4, g)
    first, second = epoch(0), epoch(1)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(first), torch.cat(second))
    order = shuffled(["a", "b", "c", "d"], torch.Generator().manual_seed(0))
    assert sorted(order(0)) == ["a", "b", "c", "d"]


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 6),
    lr=st.floats(1e-3, 0.1),
    scale=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_adam_equals_torch_adam(n: int, lr: float, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    start, target = torch.randn(n, generator=g), scale * torch.randn(n, generator=g)
    finals = []
    for factory in (adam(lr), torch_optimizer(lambda ps: torch.optim.Adam(ps, lr=lr))):
        x = start.clone().requires_grad_(True)
        fit([x], [0] * 10, lambda _b, x=x: ((x - target) ** 2).sum(), epochs=1, optimizer=factory)
        finals.append(x.detach())
    assert torch.allclose(finals[0], finals[1], rtol=0, atol=1e-6)


# -- early stopping ----------------------------------------------------------------------
def scripted(values: list[float]) -> Callable[[], float]:
    it = iter(values)
    return lambda: next(it)


def test_early_stopping_stops_after_patience_and_restores_the_best() -> None:
    model = linear()
    params = list(model.parameters())
    recorder = Recorder(model)
    lines: list[str] = []
    stop = EarlyStopping(scripted([3.0, 2.0, 2.5, 2.6, 1.0, 0.5]), patience=2)
    result = fit(
        params, regression(), mse(model), epochs=6, optimizer=adam(0.05), model=model,
        early_stopping=stop, callbacks=[recorder], report=lines.append, name="t",
    )  # fmt: skip
    assert result.epochs_run == 4 and result.stopped_early and result.best_epoch == 2
    assert result.val == [3.0, 2.0, 2.5, 2.6]
    assert lines[-1].startswith("t epoch 4/6: loss ") and lines[-1].endswith(
        ", val 2.6000; stopping, no improvement in 2 epochs"
    )
    best = recorder.states[1]  # after epoch 2
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert not torch.equal(recorder.states[-1]["0.weight"], best["0.weight"])
    assert not model.training


def test_patience_reached_in_the_last_epoch_is_not_an_early_stop() -> None:
    model = linear()
    stop = EarlyStopping(scripted([1.0, 2.0, 3.0]), patience=2)
    result = fit(
        list(model.parameters()), regression(), mse(model), epochs=3, optimizer=adam(0.01),
        model=model, early_stopping=stop,
    )  # fmt: skip
    assert result.epochs_run == 3 and not result.stopped_early and result.best_epoch == 1


# -- checkpoint and resume ---------------------------------------------------------------
class Reseed(Callback):
    def epoch_start(self, epoch: int) -> None:
        torch.manual_seed(100 + epoch)


def run(epochs: int, path: Path | None) -> tuple[nn.Module, FitResult, list[str]]:
    """A dropout model with a cosine rate and validation, reseeded per epoch."""
    model = linear()
    data = regression()
    total = 5 * len(data)
    lines: list[str] = []

    def val() -> float:
        model.eval()
        with torch.no_grad():
            return float(mse(model)(data[0]))

    ckpt = None
    if path is not None:
        ckpt = SafetensorsCheckpoint(path, {"m.": model}, fingerprint="run-1", name="toy")
    result = fit(
        list(model.parameters()),
        lambda e: [
            data[i] for i in torch.randperm(4, generator=torch.Generator().manual_seed(e)).tolist()
        ],
        mse(model),
        epochs=epochs,
        optimizer=adam(0.05),
        schedule=lambda step: 0.05 * (1 - step / total),
        model=model,
        early_stopping=EarlyStopping(val, patience=10),
        checkpoint=ckpt,
        callbacks=[Reseed()],
        report=lines.append,
    )
    return model, result, lines


def test_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, whole, _ = run(5, None)
    path = tmp_path / "ck.safetensors"
    first, _, _ = run(2, path)
    assert path.is_file()
    assert not all(
        torch.equal(a, b) for a, b in zip(first.parameters(), straight.parameters(), strict=True)
    )
    resumed, result, lines = run(5, path)
    assert lines[0] == f"toy: resuming from {str(path)!r} after epoch 2"
    assert len(lines) == 4  # the resume line and epochs 3..5
    assert result.resumed_from == 2
    assert result.losses == whole.losses and result.val == whole.val
    assert result.best_epoch == whole.best_epoch
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_of_another_run_is_ignored_and_junk_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.safetensors"
    run(1, path)
    model = linear()
    other = SafetensorsCheckpoint(path, {"m.": model}, fingerprint="run-2")
    with pytest.warns(UserWarning, match="another run"):
        assert other.load(adam(0.1)(list(model.parameters())), lambda _m: None) is None
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    bad = SafetensorsCheckpoint(junk, {"m.": model}, fingerprint="x", key="opt.ckpt")
    with pytest.raises(ValueError, match=r"opt\.ckpt: .* is not a fit checkpoint"):
        bad.load(adam(0.1)(list(model.parameters())), lambda _m: None)


# -- events and errors -------------------------------------------------------------------
def test_events_come_in_the_documented_order() -> None:
    x = torch.zeros(3, requires_grad=True)
    recorder = Recorder()
    fit(
        [x], [0, 1, 2], quadratic(x), epochs=2, optimizer=adam(0.1), callbacks=[recorder],
        report=lambda line: recorder.events.append(line.split(":")[0]),
    )  # fmt: skip
    assert recorder.events == [
        "start 0", "step 1", "step 2", "step 3", "fit epoch 1/2", "end 0",
        "start 1", "step 4", "step 5", "step 6", "fit epoch 2/2", "end 1",
    ]  # fmt: skip


def test_model_mode_is_set_per_epoch_and_eval_at_the_end() -> None:
    model = linear()
    modes: list[bool] = []

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        modes.append(model.training)
        return mse(model)(batch)

    params = list(model.parameters())
    fit(params, regression(2), loss, epochs=1, optimizer=adam(0.1), model=model)
    fit(params, regression(2), loss, epochs=1, optimizer=adam(0.1), model=model, train_mode=False)
    assert modes == [True, True, False, False] and not model.training


def test_non_finite_loss_raises_before_the_update() -> None:
    x = torch.ones(2, requires_grad=True)
    nan = lambda _b: (x * float("nan")).sum()  # noqa: E731
    with pytest.raises(ModelError, match="t: the loss became nan in epoch 1"):
        fit([x], [0], nan, epochs=1, optimizer=adam(0.1), name="t")
    assert torch.equal(x, torch.ones(2))
    result = fit([x], [0], nan, epochs=1, optimizer=adam(0.1), check_finite=False)
    assert math.isnan(result.losses[0]) and bool(x.isnan().all())  # trained on regardless


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, "epochs must be an integer >= 0"),
        ({"params": []}, "params is empty"),
        ({"params": [torch.zeros(2)]}, r"params\[0\] is not a tensor requiring gradients"),
        ({"batches": []}, "epoch 1 has no batches"),
        ({"early_stopping": EarlyStopping(lambda: 0.0, 1)}, "pass model"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    x = torch.zeros(2, requires_grad=True)
    args: dict[str, Any] = {"params": [x], "batches": [0], "epochs": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit(args.pop("params"), args.pop("batches"), quadratic(x), optimizer=adam(0.1), **args)


def test_bad_patience_and_stateless_checkpoint_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="patience must be >= 1"):
        EarlyStopping(lambda: 0.0, 0)
    model = linear()
    ckpt = SafetensorsCheckpoint(tmp_path / "c.safetensors", {"m.": model}, fingerprint="f")
    sgd = torch_optimizer(lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match="needs an optimizer with state tensors"):
        fit(list(model.parameters()), regression(1), mse(model), epochs=1, optimizer=sgd,
            checkpoint=ckpt)  # fmt: skip
