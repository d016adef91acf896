"""Knowledge-distillation losses: small pure functions of student and teacher outputs.

Every function takes the student's tensor first and the teacher's second; the teacher's is
treated as a constant (detached). Shapes are given per function; a mismatch raises
``ValueError`` naming both shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Projection = Callable[[torch.Tensor], torch.Tensor]


def _same_shape(what: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: the student's shape {tuple(student.shape)} differs from the teacher's "
            f"{tuple(teacher.shape)}"
        )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al.'s distillation loss over logits (..., C), rows = every leading index:

        alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)

    with the KL summed over classes and averaged over rows, CE averaged over rows. The ``T^2``
    keeps the soft term's gradient about the same size whatever ``T`` (its gradient with
    respect to ``s`` is ``T * (softmax(s/T) - softmax(t/T))``, about ``(s - t) / C`` for large
    ``T``). ``alpha = 1``: the soft term only (``labels`` may be None); ``alpha = 0``: exactly
    the cross-entropy (the teacher is not used)."""
    if not temperature > 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd_loss: alpha must be in [0, 1], got {alpha}")
    _same_shape("kd_loss", student_logits, teacher_logits)
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes)  # (N, C)
    if alpha < 1 and labels is None:
        raise ValueError("kd_loss: labels are needed when alpha < 1 (the hard term)")
    hard = F.cross_entropy(s, labels.reshape(-1)) if labels is not None and alpha < 1 else None
    if alpha == 0 and hard is not None:
        return hard
    t = teacher_logits.detach().reshape(-1, classes)  # (N, C)
    soft = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    total = alpha * temperature**2 * soft
    return total if hard is None else total + (1 - alpha) * hard


def hint_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    projection: Projection | None = None,
) -> torch.Tensor:
    """FitNets hint loss: ``mean((projection(s) - t)^2)``, the projection (a learned Linear
    on the last dim, or a 1x1 Conv2d for (B, C, H, W) maps) mapping the student's width to the
    teacher's; None when they already have the same shape."""
    projected = projection(student_feat) if projection is not None else student_feat
    _same_shape("hint_loss", projected, teacher_feat)
    return F.mse_loss(projected, teacher_feat.detach())


def attention_loss(
    student_attn: Sequence[torch.Tensor],
    teacher_attn: Sequence[torch.Tensor],
    layer_map: Sequence[int] | None = None,
) -> torch.Tensor:
    """MSE between attention probability maps (B, heads, T, T), averaged over layers
    (TinyBERT / MiniLM style): student layer ``i`` is compared with teacher layer
    ``layer_map[i]``; by default layer ``i`` with teacher layer ``(i + 1) * Lt // Ls - 1``
    (uniform mapping, the last with the last). Heads and tokens must match."""
    if not student_attn:
        raise ValueError("attention_loss: no student attention maps")
    n_s, n_t = len(student_attn), len(teacher_attn)
    mapping = (
        list(layer_map) if layer_map is not None else [(i + 1) * n_t // n_s - 1 for i in range(n_s)]
    )
    if len(mapping) != n_s or not all(0 <= j < n_t for j in mapping):
        raise ValueError(f"attention_loss: layer map {mapping} does not fit {n_s} -> {n_t} layers")
    terms = []
    for s, j in zip(student_attn, mapping, strict=True):
        t = teacher_attn[j]
        _same_shape("attention_loss", s, t)
        terms.append(F.mse_loss(s, t.detach()))
    return torch.stack(terms).mean()


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, heads, T, T) attention probabilities ``softmax(q kᵀ / sqrt(d))`` per head from
    (B, T, heads * d) query and key projections; ``mask`` (B, T), 1 for real tokens, gives
    padded keys zero probability (every row keeps at least one key: the mask's real ones)."""
    b, t, width = query.shape
    if width % heads or key.shape != query.shape:
        raise ValueError(
            f"attention_probs: query {tuple(query.shape)} and key {tuple(key.shape)} do not "
            f"split into {heads} heads"
        )
    d = width // heads
    q = query.reshape(b, t, heads, d).transpose(1, 2)  # (B, H, T, d)
    k = key.reshape(b, t, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def embedding_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """Distance between embeddings (..., D), rows = every leading index:
    ``cosine``: ``1 - mean(cos(s, t))`` (0 for identical directions);
    ``mse``: ``mean((s - t)^2)``."""
    _same_shape("embedding_loss", student, teacher)
    t = teacher.detach()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, t, dim=-1).mean()
    if kind == "mse":
        return F.mse_loss(student, t)
    raise ValueError(f"embedding_loss: kind must be cosine or mse, got {kind!r}")
