"""SmoothQuant: move activation outliers into the weights before int8 quantization.

For a linear layer ``y = x W^T``, per input channel j: ``s_j = max|x_j|^a / max|W_j|^(1-a)``;
then ``y = (x / s) (W * s)^T`` exactly, while ``x / s`` has flatter channels (easier per-token
quantization) and ``W * s`` absorbs the difficulty (per-channel weights tolerate it).
"""

from __future__ import annotations

import torch

_FLOOR = 1e-5


def smoothing_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """``s`` (K,) from the activations' per-channel max |x| (K,) and the weight (N, K).

    Channels that never saw a nonzero activation, or whose weight column is zero, get s = 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: got {alpha}; allowed: 0..1")
    w_absmax = weight.detach().abs().amax(dim=0).float()  # (K,)
    a = act_absmax.float()
    s = a.clamp(min=_FLOOR).pow(alpha) / w_absmax.clamp(min=_FLOOR).pow(1.0 - alpha)
    dead = (a <= 0) | (w_absmax <= 0)
    s = torch.where(dead | ~torch.isfinite(s), torch.ones_like(s), s)
    return s.clamp(min=_FLOOR)
