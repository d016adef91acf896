"""Range observers: watch activation batches, then pick a quantization range.

An observer accumulates batches with :meth:`Observer.update` and reports ``(lo, hi)`` with
:meth:`Observer.range` (0-d tensors per tensor, ``(C,)`` per channel) and scale/zero point with
:meth:`Observer.qparams`.

* ``minmax``: running min/max.
* ``moving_average``: exponential moving average of per-batch min/max.
* ``percentile``: a range keeping at least ``percentile`` % of the values.
* ``mse``: the shrunken min/max range with the smallest quantization MSE.
* ``kl``: entropy calibration; the threshold minimizing the KL divergence between the
  clipped distribution and its quantized version.

The last three need the value distribution. They keep the exact min/max plus a bounded,
deterministic sample: up to ``2**18`` values per batch drawn with a seeded generator, merged
into a sample of at most ``2**20`` values in which every batch is represented in proportion to
its size. Batches small enough are kept whole, so small data is observed exactly. These three
are per-tensor only.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch

from slimkit.formats.primitives import params_from_range, qrange

PER_UPDATE_SAMPLE = 2**18
SAMPLE_CAP = 2**20
MSE_SAMPLE = 2**17  # values the MSE search scores each candidate on
MSE_CHUNK = 2**21  # elements of one (candidates, values) error matrix


class Observer(abc.ABC):
    """Accumulates activation statistics and turns them into a quantization range."""

    name: ClassVar[str]

    def __init__(self, channel_axis: int | None = None) -> None:
        self.channel_axis = channel_axis
        self._seen = False

    def update(self, x: torch.Tensor) -> None:
        """Add one batch. Empty tensors are ignored; NaN or Inf raise ``ValueError``."""
        x = x.detach().float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("non-finite values (NaN or Inf) in the observed tensor")
        if x.numel() == 0:
            return
        self._observe(x)
        self._seen = True

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` float32 tensors: 0-d, or (C,) with a ``channel_axis``."""
        if not self._seen:
            raise ValueError("observer saw no data")
        return self._range()

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of :meth:`range`, shaped like ``lo``."""
        lo, hi = self.range()
        return params_from_range(lo, hi, bits, symmetric)

    def _channel_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (C, N) along ``channel_axis``."""
        assert self.channel_axis is not None
        if x.dim() == 0:
            raise ValueError("per-channel observation needs a tensor with a channel axis")
        return x.movedim(self.channel_axis, 0).reshape(x.shape[self.channel_axis], -1)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of one batch: 0-d, or (C,) per channel."""
        if self.channel_axis is None:
            lo, hi = torch.aminmax(x)
            return lo, hi
        rows = self._channel_rows(x)  # (C, N)
        if rows.shape[1] == 0:
            raise ValueError("per-channel observation needs values in every channel")
        lo, hi = torch.aminmax(rows, dim=1)  # (C,), (C,)
        return lo, hi

    @staticmethod
    def _check_channels(old: torch.Tensor, new: torch.Tensor) -> None:
        if old.shape != new.shape:
            raise ValueError(
                f"channel count changed between batches: {tuple(old.shape)} -> {tuple(new.shape)}"
            )

    @abc.abstractmethod
    def _observe(self, x: torch.Tensor) -> None:
        """Accumulate a finite, non-empty float32 batch."""

    @abc.abstractmethod
    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range, called only after at least one batch."""


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches."""

    name = "minmax"

    def __init__(self, channel_axis: int | None = None) -> None:
        super().__init__(channel_axis)
        self._lo = torch.zeros(())
        self._hi = torch.zeros(())

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if not self._seen:
            self._lo, self._hi = lo, hi
            return
        self._check_channels(self._lo, lo)
        self._lo, self._hi = self._merge(lo, hi)

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The running range after a batch of range ``lo``, ``hi``."""
        return torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lo.clone(), self._hi.clone()


class MovingAverageObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max; the first batch initialises it.

    ``lo <- momentum * lo + (1 - momentum) * batch_min`` (and likewise ``hi``).
    """

    name = "moving_average"

    def __init__(self, momentum: float = 0.9, channel_axis: int | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: got {momentum}; allowed: [0, 1)")
        super().__init__(channel_axis)
        self.momentum = momentum

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.momentum
        return m * self._lo + (1.0 - m) * lo, m * self._hi + (1.0 - m) * hi


class _SampledObserver(Observer):
    """Exact min/max plus a bounded, deterministic sample of the observed values."""

    def __init__(self, channel_axis: int | None = None, seed: int = 0) -> None:
        if channel_axis is not None:
            raise ValueError(f"the {self.name} observer is per-tensor only; got channel_axis")
        super().__init__(None)
        self._gen = torch.Generator().manual_seed(seed)
        self._min = torch.zeros(())
        self._max = torch.zeros(())
        self._sample = torch.zeros(0)  # (S,), S <= SAMPLE_CAP
        self._count = 0  # values observed so far
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def _draw(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """``k`` of ``values`` picked with the generator (all of them when ``k`` covers them)."""
        if k >= values.numel():
            return values
        if values.numel() <= SAMPLE_CAP:
            idx = torch.randperm(values.numel(), generator=self._gen)[:k]  # (k,)
        else:  # with replacement: no permutation of a huge batch
            idx = torch.randint(values.numel(), (k,), generator=self._gen)  # (k,)
        return values[idx]

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1).cpu()  # (n,)
        lo, hi = torch.aminmax(flat)
        self._min = lo if not self._seen else torch.minimum(self._min, lo)
        self._max = hi if not self._seen else torch.maximum(self._max, hi)
        # one sampling rate for every value seen keeps the sample uniform over all batches
        old, count, n = self._sample, self._count, flat.numel()
        rate = min(1.0, PER_UPDATE_SAMPLE / n, SAMPLE_CAP / (count + n))
        if count:
            rate = min(rate, old.numel() / count)
        k_old = min(old.numel(), round(rate * count))
        k_new = min(n, round(rate * n), SAMPLE_CAP - k_old)
        self._sample = torch.cat([self._draw(old, k_old), self._draw(flat, k_new)])  # (S,)
        self._count += n
        self._cached = None

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached is None:
            self._cached = self._compute_range()
        lo, hi = self._cached
        return lo.clone(), hi.clone()

    def _symmetric_clip(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range ``[-t, t]`` intersected with the observed ``[min, max]``."""
        t = t.to(torch.float32)
        return torch.maximum(self._min, -t), torch.minimum(self._max, t)

    @abc.abstractmethod
    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range from the sample and the exact min/max."""


class PercentileObserver(_SampledObserver):
    """A range keeping at least ``percentile`` % of the observed values.

    ``symmetric=False`` clips both tails, each at most ``(100 - percentile) / 2`` %;
    ``symmetric=True`` clips ``|x|`` above its ``percentile`` quantile. The bound is exact for
    data kept whole (small batches) and holds in expectation for sampled data.
    """

    name = "percentile"

    def __init__(
        self,
        percentile: float = 99.99,
        symmetric: bool = False,
        channel_axis: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile: got {percentile}; allowed: (0, 100]")
        super().__init__(channel_axis, seed)
        self.percentile = percentile
        self.symmetric = symmetric

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.percentile / 100.0
        if self.symmetric:
            mags = self._sample.abs().sort().values  # (S,)
            t = mags[math.ceil(keep * (mags.numel() - 1))]
            return self._symmetric_clip(t)
        values = self._sample.sort().values  # (S,)
        tail = (1.0 - keep) / 2.0
        lo = values[math.floor(tail * (values.numel() - 1))]
        hi = values[math.ceil((1.0 - tail) * (values.numel() - 1))]
        return torch.maximum(self._min, lo), torch.minimum(self._max, hi)


def _quant_mse(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Mean squared error of fake-quantizing ``x`` (N,) with each range ``[lo, hi]``: (F,)."""
    qmin, qmax = qrange(bits, symmetric)
    scale, zero = params_from_range(lo, hi, bits, symmetric)  # (F,), (F,)
    s, z = scale[:, None], zero[:, None]  # (F, 1)
    err = torch.div(x[None, :], s).round_().add_(z).clamp_(qmin, qmax)  # (F, N) codes
    err = err.sub_(z).mul_(s).sub_(x[None, :])  # (F, N) dequantized - x
    return err.square_().sum(dim=1, dtype=torch.float64) / x.numel()  # (F,)


class MSEObserver(_SampledObserver):
    """The shrunken min/max range with the smallest quantization MSE for ``bits``.

    Candidates are ``f * [min, max]`` for ``steps`` factors ``f`` evenly spaced in
    ``[min_factor, 1]`` (``f = 1`` included, so the choice is never worse than min/max on the
    sample). Ties go to the wider range. Candidates are scored on an evenly strided subset of at
    most ``MSE_SAMPLE`` values of the sample (all of it for small data).
    """

    name = "mse"

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        steps: int = 100,
        min_factor: float = 0.01,
        channel_axis: int | None = None,
        seed: int = 0,
    ) -> None:
        qrange(bits, symmetric)  # validates bits
        if steps < 1 or not 0.0 < min_factor <= 1.0:
            raise ValueError(
                f"steps >= 1 and min_factor in (0, 1] required; got {steps}, {min_factor}"
            )
        super().__init__(channel_axis, seed)
        self.bits, self.symmetric = bits, symmetric
        self.steps, self.min_factor = steps, min_factor

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        factors = torch.linspace(1.0, self.min_factor, self.steps)  # (F,), widest first
        lo = self._min.clamp(max=0.0) * factors  # (F,)
        hi = self._max.clamp(min=0.0) * factors  # (F,)
        sample = self._sample[:: -(-self._sample.numel() // MSE_SAMPLE)]  # (<= MSE_SAMPLE,)
        errs = self._errors(sample, lo, hi)  # (F,)
        best = int(torch.argmin(errs))  # the first minimum: the widest range among ties
        return torch.maximum(self._min, lo[best]), torch.minimum(self._max, hi[best])

    def _errors(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Quantization MSE of ``x`` (N,) for each candidate range (F,), in bounded passes."""
        per_pass = max(1, MSE_CHUNK // x.numel())
        parts = [
            _quant_mse(x, lo[i : i + per_pass], hi[i : i + per_pass], self.bits, self.symmetric)
            for i in range(0, lo.numel(), per_pass)
        ]
        return torch.cat(parts)  # (F,)


def _kl_divergences(hist: torch.Tensor, n_levels: int) -> torch.Tensor:
    """KL(P_i || Q_i) for every cut ``i`` in ``[n_levels, bins]`` of a (bins,) histogram.

    ``P_i`` is the histogram cut to ``i`` bins with the outlier mass added to bin ``i - 1``.
    ``Q_i`` merges the first ``i`` (unclipped) bins into ``n_levels`` chunks, chunk ``c``
    holding bins ``j`` with ``j * n_levels // i == c``, and spreads each chunk's mass evenly
    over its bins where ``P_i`` is non-zero. Both are normalized. Bins that ``P_i`` needs but
    ``Q_i`` leaves empty get a tiny probability, a large finite penalty.

    Per-chunk sums come from prefix sums, so the cost is O(cuts * n_levels), not
    O(cuts * bins).
    """
    h = hist.double()  # (B,)
    total = h.sum()
    pad = h.new_zeros(1)
    h_cum = torch.cat([pad, h.cumsum(0)])  # (B + 1,) h_cum[k] = sum of h[:k]
    nz_cum = torch.cat([pad, (h > 0).double().cumsum(0)])  # (B + 1,)
    plogp_cum = torch.cat([pad, torch.special.xlogy(h, h).cumsum(0)])  # (B + 1,)

    cuts = torch.arange(n_levels, h.numel() + 1)  # (M,)
    levels = torch.arange(n_levels + 1)  # (L + 1,)
    edges = (levels[None, :] * cuts[:, None] + n_levels - 1) // n_levels  # (M, L + 1)
    lo_edge, hi_edge = edges[:, :-1], edges[:, 1:]  # (M, L) chunk c is bins [lo, hi)

    tail = total - h_cum[cuts]  # (M,) mass beyond each cut
    h_last = h[cuts - 1]  # (M,)
    p_last = h_last + tail  # (M,) P_i at bin i - 1
    mass = h_cum[hi_edge] - h_cum[lo_edge]  # (M, L) unclipped mass per chunk
    support = nz_cum[hi_edge] - nz_cum[lo_edge]  # (M, L) bins with P_i > 0 per chunk
    support[:, -1] += (p_last > 0).double() - (h_last > 0).double()
    p_mass = mass.clone()  # (M, L) P_i summed per chunk
    p_mass[:, -1] += tail

    q_bin = mass / support.clamp(min=1.0) / mass.sum(dim=1, keepdim=True).clamp(min=1e-300)
    q_bin = torch.where((p_mass > 0) & (q_bin <= 0), 1e-12, q_bin)  # (M, L)
    cross = torch.special.xlogy(p_mass, q_bin).sum(dim=1)  # (M,) sum of P log q
    plogp = plogp_cum[cuts - 1] + torch.special.xlogy(p_last, p_last)  # (M,) sum of P log P
    return (plogp - cross) / total - torch.log(total)  # (M,), M = bins - n_levels + 1


class KLObserver(_SampledObserver):
    """Entropy calibration on a ``bins``-bin histogram of the non-zero values.

    Picks the threshold ``t`` (a bin edge, at least ``n_levels`` bins up) whose clipped
    distribution is closest, in KL divergence, to its quantization with ``n_levels`` levels.
    For a ``symmetric`` quantizer, or data on both sides of zero, the histogram is of ``|x|``
    with ``2^(bits-1)`` levels and the range is ``[-t, t]``; for an asymmetric quantizer of
    non-negative data (after a ReLU) it is of ``x`` itself with all ``2^bits`` levels and the
    range is ``[min, t]``. Either way the range is intersected with the observed min/max.
    Exact zeros are left out of the histogram: every range represents them exactly, and their
    mass (large after a ReLU) would otherwise pull the threshold towards zero. Thresholds that
    clip more than ``max_clip`` of the non-zero values are not considered: on data with few
    distinct values (image pixels) a cut just above one spike has zero divergence, because the
    clipped mass is folded into the last kept bin, and would otherwise win.
    """

    name = "kl"

    def __init__(
        self,
        bits: int = 8,
        bins: int = 2048,
        symmetric: bool = True,
        max_clip: float = 0.01,
        channel_axis: int | None = None,
        seed: int = 0,
    ) -> None:
        qrange(bits, symmetric)  # validates bits
        if bins < 2**bits:
            raise ValueError(f"bins: got {bins}; allowed: >= {2**bits} for {bits} bits")
        if not 0.0 <= max_clip < 1.0:
            raise ValueError(f"max_clip: got {max_clip}; allowed: [0, 1)")
        super().__init__(channel_axis, seed)
        self.bits, self.bins, self.symmetric = bits, bins, symmetric
        self.max_clip = max_clip

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        one_sided = not self.symmetric and float(self._min) >= 0.0
        values = self._sample if one_sided else self._sample.abs()  # (S,)
        values = values[values > 0]
        if values.numel() == 0:
            return self._min.clone(), self._max.clone()
        top = float(values.max())
        hist = torch.histc(values, bins=self.bins, min=0.0, max=top).double()  # (B,)
        n_levels = 2**self.bits if one_sided else 2 ** (self.bits - 1)
        kl = _kl_divergences(hist, n_levels)  # (M,) for cuts n_levels..B
        kept = hist.cumsum(0)[n_levels - 1 :]  # (M,) values below each cut
        clipped = 1.0 - kept / kept[-1]  # (M,) fraction clipped; the last cut clips nothing
        kl = torch.where(clipped <= self.max_clip, kl, torch.inf)
        best = int(torch.argmin(kl)) + n_levels  # bins kept
        t = torch.tensor(top * best / self.bins, dtype=torch.float64)
        if one_sided:
            return self._min.clone(), torch.minimum(self._max, t.to(torch.float32))
        return self._symmetric_clip(t)


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls
    for cls in (MinMaxObserver, MovingAverageObserver, PercentileObserver, MSEObserver, KLObserver)
}


def make_observer(name: str, **kwargs: Any) -> Observer:
    """A new observer by name (see :data:`OBSERVERS`), constructed with ``kwargs``."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; allowed: {', '.join(OBSERVERS)}")
    return OBSERVERS[name](**kwargs)
