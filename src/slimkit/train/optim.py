"""Which tensors train, and the optimizer that updates them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


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
