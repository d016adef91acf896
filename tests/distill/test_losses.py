"""The pure distillation losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.distill.losses import attention_loss, embedding_loss, hint_loss, kd_loss


def logits(seed: int, n: int = 4, c: int = 5) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def test_kd_loss_equals_hand_computed_value() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([1, 2])
    T, alpha = 2.0, 0.7

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        p, q = softmax(trow), softmax(srow)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    kl /= 2
    ce = 0.0
    for row, y in zip(s.tolist(), labels.tolist(), strict=True):
        ce -= row[y] - math.log(sum(math.exp(v) for v in row))
    ce /= 2
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert float(kd_loss(s, t, labels, T, alpha)) == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_is_exactly_cross_entropy_and_alpha_one_needs_no_labels() -> None:
    s, t, y = logits(0), logits(1), torch.tensor([0, 3, 1, 4])
    assert torch.equal(kd_loss(s, t, y, 4.0, 0.0), F.cross_entropy(s, y))
    soft = kd_loss(s, t, None, 4.0, 1.0)
    assert torch.equal(soft, kd_loss(s, t, y, 4.0, 1.0))
    assert float(kd_loss(s, s, None, 3.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(s, t, None, 4.0, 0.5)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 3\)"):
        kd_loss(s, logits(1, c=3), None, 4.0, 1.0)


def test_temperature_squared_keeps_the_gradient_scale() -> None:
    t = logits(1)
    grads = {}
    for T in (1.0, 8.0, 16.0, 32.0):
        s = logits(0).requires_grad_(True)
        (g,) = torch.autograd.grad(kd_loss(s, t, None, T, 1.0), [s])
        # the formula: d/ds of T^2 KL = T * (softmax(s/T) - softmax(t/T)) / rows
        formula = T * (F.softmax(s / T, dim=1) - F.softmax(t / T, dim=1)) / s.shape[0]
        torch.testing.assert_close(g, formula.detach())
        grads[T] = float(g.norm())
    # without T^2 the gradient would shrink as 1/T; with it, it levels off at high T
    assert grads[16.0] / grads[8.0] == pytest.approx(1.0, abs=0.05)
    assert grads[32.0] / grads[16.0] == pytest.approx(1.0, abs=0.02)


def test_embedding_loss() -> None:
    a = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    assert float(embedding_loss(a, a.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(embedding_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)  # direction only
    assert float(embedding_loss(a, -a)) == pytest.approx(2.0, abs=1e-6)
    assert float(embedding_loss(a, a, kind="mse")) == 0.0
    assert float(embedding_loss(a, a + 1, kind="mse")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kind"):
        embedding_loss(a, a, kind="l1")


def test_hint_loss_with_and_without_projection() -> None:
    s = torch.randn(2, 4, 3, 3)
    t = torch.randn(2, 6, 3, 3)
    conv = nn.Conv2d(4, 6, 1)
    expected = F.mse_loss(conv(s), t)
    assert torch.equal(hint_loss(s, t, conv), expected)
    assert torch.equal(hint_loss(t, t.clone()), torch.tensor(0.0))
    lin = nn.Linear(4, 6)
    x, y = torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    assert torch.equal(hint_loss(x, y, lin), F.mse_loss(lin(x), y))
    with pytest.raises(ValueError, match=r"\(2, 5, 4\).*\(2, 5, 6\)"):
        hint_loss(x, y)


def test_attention_loss() -> None:
    def maps(seed: int, layers: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(2, 3, 4, 4, generator=g).softmax(dim=-1) for _ in range(layers)]

    teacher = maps(0, 4)
    assert float(attention_loss(teacher, teacher)) == 0.0
    student = maps(1, 2)  # uniform mapping: student 0 -> teacher 1, student 1 -> teacher 3
    expected = (F.mse_loss(student[0], teacher[1]) + F.mse_loss(student[1], teacher[3])) / 2
    torch.testing.assert_close(attention_loss(student, teacher), expected)
    explicit = attention_loss(student, teacher, layer_map=[0, 2])
    expected = (F.mse_loss(student[0], teacher[0]) + F.mse_loss(student[1], teacher[2])) / 2
    torch.testing.assert_close(explicit, expected)
    with pytest.raises(ValueError, match="layer map"):
        attention_loss(student, teacher, layer_map=[0, 9])
