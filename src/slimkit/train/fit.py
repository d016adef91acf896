"""The one training loop of slimkit: :func:`fit`.

``fit`` minimises ``loss_fn(batch)`` over the batches of every epoch. Each update is the same
sequence, whatever the optimizer (:mod:`slimkit.train.optim`):

1. with a ``schedule``, the learning rate of the update is set to ``schedule(steps done)``;
2. the batch's loss is computed; with ``check_finite`` a NaN or Inf loss raises ModelError
   before any update;
3. its gradients with respect to ``params`` (``torch.autograd.grad``; ``None`` for a tensor
   the loss does not use) go to ``optimizer.step(grads)``;
4. the callbacks hear ``step_end``.

Around the updates, per epoch: the callbacks hear ``epoch_start``, ``model`` is put in train
mode (eval mode with ``train_mode=False``), the batches of the epoch are drawn; after them
the monitored value of ``early_stopping`` is measured, a progress line is reported
(``"{name} epoch e/E: loss L[, val V][; stopping, ...]"``), the ``checkpoint`` is saved and
the callbacks hear ``epoch_end``. At the end the best state (early stopping) is loaded back
and ``model`` is left in eval mode. Runs with gradients enabled and inference mode off.

A run resumed from a checkpoint ends where an uninterrupted one does when the batches and the
random state of an epoch depend on the epoch alone (reseed in ``epoch_start``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import torch
from torch import nn

from slimkit.context import Progress
from slimkit.errors import ModelError
from slimkit.train.optim import Optimizer, OptimizerFactory

B = TypeVar("B")


@dataclasses.dataclass
class FitResult:
    """What a run did: per epoch (those before a resume included) the mean training loss and
    the monitored value (empty without early stopping)."""

    losses: list[float] = dataclasses.field(default_factory=list)
    val: list[float] = dataclasses.field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 without early stopping
    stopped_early: bool = False
    resumed_from: int = 0  # epochs already done in the checkpoint resumed from

    @property
    def epochs_run(self) -> int:
        return len(self.losses)


@dataclasses.dataclass
class LoopState:
    """The loop between epochs: what a checkpoint holds besides the modules' and the
    optimizer's tensors."""

    epoch: int = 0  # epochs done
    best: float = math.inf  # the best monitored value
    bad: int = 0  # epochs since the best
    stopped: bool = False
    best_state: dict[str, torch.Tensor] | None = None  # the model's state_dict at the best
    result: FitResult = dataclasses.field(default_factory=FitResult)


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """After every epoch ``monitor()`` is measured (lower is better, e.g. a validation loss;
    reported as ``val``). The model's state at the best value is kept and loaded back at the
    end; training stops after ``patience`` epochs in a row without improvement."""

    monitor: Callable[[], float]
    patience: int

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1, got {self.patience}")

    def update(self, state: LoopState, model: nn.Module, epoch: int, epochs: int) -> str:
        """Measure after ``epoch`` (0-based) of ``epochs``; return the progress line's tail."""
        val = self.monitor()
        result = state.result
        result.val.append(val)
        tail = f", val {val:.4f}"
        if val < state.best:
            state.best, state.bad = val, 0
            state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result.best_epoch = epoch + 1
        else:
            state.bad += 1
            state.stopped = state.bad >= self.patience
            result.stopped_early = state.stopped and epoch + 1 < epochs
            if result.stopped_early:
                tail += f"; stopping, no improvement in {state.bad} epochs"
        return tail


class Checkpoint(Protocol):
    """Where :func:`fit` saves its state after every epoch, and resumes from."""

    def load(self, optimizer: Optimizer, report: Progress) -> LoopState | None:
        """The saved state, its tensors loaded into the modules and ``optimizer``; None to
        start afresh. ValueError when ``optimizer`` has no state to save (``Stateful``)."""
        ...

    def save(self, state: LoopState, optimizer: Optimizer) -> None: ...


class Callback:
    """Events of :func:`fit`, each a no-op unless overridden. In every epoch run:
    ``epoch_start(epoch)``, then ``step_end(steps, loss)`` after each update (``steps``:
    updates done, ``loss``: the update's loss), then ``epoch_end(epoch, result)`` after the
    progress line and the checkpoint. ``epoch`` is 0-based."""

    def epoch_start(self, epoch: int) -> None:
        pass

    def step_end(self, steps: int, loss: float) -> None:
        pass

    def epoch_end(self, epoch: int, result: FitResult) -> None:
        pass


def shuffled(items: Sequence[B], generator: torch.Generator) -> Callable[[int], list[B]]:
    """``items`` in a new order every epoch, a permutation drawn from ``generator``."""
    return lambda _epoch: [
        items[i] for i in torch.randperm(len(items), generator=generator).tolist()
    ]


def minibatches(
    n: int, size: int, generator: torch.Generator
) -> Callable[[int], list[torch.Tensor]]:
    """Every epoch the indices ``0..n-1`` permuted by ``generator`` and cut into slices of
    ``size`` (the last one shorter when ``size`` does not divide ``n``)."""

    def epoch(_epoch: int) -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=generator)  # (n,)
        return [perm[i : i + size] for i in range(0, n, size)]

    return epoch


@dataclasses.dataclass
class _Loop(Generic[B]):
    """The loop of :func:`fit` over its checked arguments (see the module doc)."""

    params: list[torch.Tensor]
    optimizer: Optimizer
    batches: Callable[[int], Iterable[B]]
    loss_fn: Callable[[B], torch.Tensor]
    epochs: int
    schedule: Callable[[int], float] | None
    model: nn.Module | None
    train_mode: bool
    early_stopping: EarlyStopping | None
    checkpoint: Checkpoint | None
    callbacks: Sequence[Callback]
    say: Progress
    name: str
    check_finite: bool

    def run(self) -> FitResult:
        state = None if self.checkpoint is None else self.checkpoint.load(self.optimizer, self.say)
        state = state or LoopState()
        for epoch in range(state.epoch, self.epochs):
            if state.stopped:
                break
            self.epoch(state, epoch)
        if self.model is not None:
            if state.best_state is not None:
                self.model.load_state_dict(state.best_state)
            self.model.eval()
        return state.result

    def epoch(self, state: LoopState, epoch: int) -> None:
        for callback in self.callbacks:
            callback.epoch_start(epoch)
        if self.model is not None:
            self.model.train(self.train_mode)
        mean = self.mean_loss(self.batches(epoch), epoch)
        state.result.losses.append(mean)
        message = f"{self.name} epoch {epoch + 1}/{self.epochs}: loss {mean:.4f}"
        if self.early_stopping is not None and self.model is not None:
            message += self.early_stopping.update(state, self.model, epoch, self.epochs)
        state.epoch = epoch + 1
        self.say(message)
        if self.checkpoint is not None:
            self.checkpoint.save(state, self.optimizer)
        for callback in self.callbacks:
            callback.epoch_end(epoch, state.result)

    def mean_loss(self, batches: Iterable[B], epoch: int) -> float:
        """One update per batch; the mean of their losses."""
        total, n = 0.0, 0
        for batch in batches:
            total += self.update(batch, epoch)
            n += 1
        if n == 0:
            raise ValueError(f"{self.name}: epoch {epoch + 1} has no batches")
        return total / n

    def update(self, batch: B, epoch: int) -> float:
        """Steps 1-4 of the module doc; the batch's loss."""
        if self.schedule is not None:
            self.optimizer.set_lr(self.schedule(self.optimizer.steps))
        loss = self.loss_fn(batch)
        value = float(loss.detach())
        if self.check_finite and not math.isfinite(value):
            raise ModelError(f"{self.name}: the loss became {value} in epoch {epoch + 1}")
        self.optimizer.step(torch.autograd.grad(loss, self.params, allow_unused=True))
        for callback in self.callbacks:
            callback.step_end(self.optimizer.steps, value)
        return value


def fit(
    params: Sequence[torch.Tensor],
    batches: Sequence[B] | Callable[[int], Iterable[B]],
    loss_fn: Callable[[B], torch.Tensor],
    *,
    epochs: int,
    optimizer: OptimizerFactory,
    schedule: Callable[[int], float] | None = None,
    model: nn.Module | None = None,
    train_mode: bool = True,
    early_stopping: EarlyStopping | None = None,
    checkpoint: Checkpoint | None = None,
    callbacks: Sequence[Callback] = (),
    report: Progress | None = None,
    name: str = "fit",
    check_finite: bool = True,
) -> FitResult:
    """Train ``params`` (tensors requiring gradients) for ``epochs`` (see the module doc).

    ``batches``: the same batches every epoch, or a function of the epoch (0-based) giving
    its batches (:func:`shuffled`, :func:`minibatches`). ``optimizer`` builds the optimizer
    of ``params``. ``schedule(step)``: the learning rate of update ``step`` (0-based). ``model``
    is the module whose mode is set and whose state early stopping keeps (required with
    ``early_stopping``). ``name`` heads progress lines and errors. ValueError on bad arguments."""
    tensors = _checked(params, epochs, model, early_stopping)
    per_epoch = batches if callable(batches) else (lambda _epoch: batches)
    say = report or (lambda _message: None)
    with torch.inference_mode(False), torch.enable_grad():
        loop = _Loop(
            tensors, optimizer(tensors), per_epoch, loss_fn, epochs, schedule, model, train_mode,
            early_stopping, checkpoint, callbacks, say, name, check_finite,
        )  # fmt: skip
        return loop.run()


def _checked(
    params: Sequence[torch.Tensor],
    epochs: int,
    model: nn.Module | None,
    early_stopping: EarlyStopping | None,
) -> list[torch.Tensor]:
    """``params`` as a list; ValueError naming the first bad argument."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be an integer >= 0, got {epochs!r}")
    tensors = list(params)
    if not tensors:
        raise ValueError("fit: params is empty; there is nothing to train")
    for i, t in enumerate(tensors):
        if not (isinstance(t, torch.Tensor) and t.requires_grad):
            raise ValueError(f"fit: params[{i}] is not a tensor requiring gradients")
    if early_stopping is not None and model is None:
        raise ValueError("fit: early stopping keeps the model's best state; pass model")
    return tensors
