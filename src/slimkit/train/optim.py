"""Which tensors train, and the optimizers :func:`~slimkit.train.fit.fit` drives.

An optimizer here takes the gradients as an argument (``step(grads)``): ``fit`` computes
them once, the same way for every optimizer. :class:`Adam` is written out; a ``torch.optim``
optimizer (with its learning-rate scheduler) is wrapped by :class:`TorchOptimizer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

#: builds the optimizer of the given tensors
OptimizerFactory = Callable[[list[torch.Tensor]], "Optimizer"]


@contextlib.contextmanager
def only_grad(model: nn.Module, weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside, ``weights`` require gradients and no other parameter does; flags restored."""
    tensors = {id(t): t for t in [*model.parameters(), *weights]}.values()
    flags = [(t, t.requires_grad) for t in tensors]
    chosen = {id(w) for w in weights}
    try:
        for t, _ in flags:
            t.requires_grad_(id(t) in chosen)
        yield
    finally:
        for t, flag in flags:
            t.requires_grad_(flag)


class Optimizer(Protocol):
    """Updates its tensors in place from given gradients, one per tensor (``None``: unused)."""

    @property
    def steps(self) -> int:
        """Updates made so far."""
        ...

    def set_lr(self, lr: float) -> None: ...

    def step(self, grads: Sequence[torch.Tensor | None]) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    """An optimizer whose state a checkpoint can hold: named tensors and the step count."""

    @property
    def steps(self) -> int: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, tensors: Mapping[str, torch.Tensor], steps: int) -> None: ...


class Adam:
    """Adam over a few small tensors, updated in place from given gradients.

    Written out because the codebooks hold a few dozen values each and the first use of
    ``torch.optim`` imports the compiler stack, which costs seconds.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]  # first moments
        self.v = [torch.zeros_like(p) for p in self.params]  # second moments
        self.steps = 0

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None]) -> None:
        """One update; a ``None`` gradient (a tensor the loss did not use) leaves it as is."""
        b1, b2 = self.betas
        self.steps += 1
        fix1, fix2 = 1 - b1**self.steps, 1 - b2**self.steps  # bias corrections
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            if g is None:
                continue
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(self.lr * (m / fix1) / ((v / fix2).sqrt() + self.eps))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the moments: ``adam.m.{j}`` and ``adam.v.{j}`` of tensor ``j``."""
        out: dict[str, torch.Tensor] = {}
        for j, (m, v) in enumerate(zip(self.m, self.v, strict=True)):
            out[f"adam.m.{j}"] = m.detach().clone().contiguous()
            out[f"adam.v.{j}"] = v.detach().clone().contiguous()
        return out

    @torch.no_grad()
    def load_state(self, tensors: Mapping[str, torch.Tensor], steps: int) -> None:
        """The moments of :meth:`state_tensors` copied in, and the step count."""
        for j, (m, v) in enumerate(zip(self.m, self.v, strict=True)):
            m.copy_(tensors[f"adam.m.{j}"])
            v.copy_(tensors[f"adam.v.{j}"])
        self.steps = steps


def adam(lr: float) -> OptimizerFactory:
    """The factory of :class:`Adam` at ``lr``."""
    return lambda params: Adam(params, lr=lr)


class TorchOptimizer:
    """A ``torch.optim`` optimizer behind :class:`Optimizer`: each update sets the given
    gradients as the tensors' ``.grad`` (replacing the previous ones, as ``zero_grad`` with
    ``set_to_none`` and a backward pass would), steps the optimizer, then the scheduler when
    there is one. The last gradients stay on ``.grad``. ``params`` are the optimizer's tensors
    in the order the gradients come in."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if held != {id(p) for p in params}:
            raise ValueError("TorchOptimizer: the optimizer does not hold exactly the params")
        self.params, self.optimizer, self.scheduler = list(params), optimizer, scheduler
        self.steps = 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1


def torch_optimizer(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
    | None = None,
) -> OptimizerFactory:
    """The factory of a :class:`TorchOptimizer`: ``make(params)``, with ``scheduler`` of it."""

    def build(params: list[torch.Tensor]) -> TorchOptimizer:
        opt = make(params)
        return TorchOptimizer(params, opt, None if scheduler is None else scheduler(opt))

    return build
