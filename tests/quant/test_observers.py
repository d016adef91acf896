"""Range observers: exact min/max, moving average, percentile, MSE and KL calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slimkit.formats import primitives as P
from slimkit.quant import observers as O

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
batch = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8), elements=finite
)
batches = st.lists(batch, min_size=1, max_size=5)
data_1d = hnp.arrays(np.float32, st.integers(1, 400), elements=finite)


def laplace_with_outliers(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1)
    x[:4] = torch.tensor([60.0, -45.0, 52.0, 70.0])
    return x


def quant_mse(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool
) -> float:
    rows = x.reshape(1, -1)
    codes = P.quantize(rows, scale.reshape(1, 1), zero.reshape(1, 1), bits, sym)
    dq = P.dequantize(codes, scale.reshape(1, 1), zero.reshape(1, 1))
    return float((dq.double() - rows.double()).square().mean())


# --- min/max and moving average ------------------------------------------------------------


@SETTINGS
@given(xs=batches)
def test_minmax_is_the_true_range(xs: list[np.ndarray]) -> None:
    obs = O.MinMaxObserver()
    for x in xs:
        obs.update(torch.from_numpy(x))
    lo, hi = obs.range()
    everything = np.concatenate([x.reshape(-1) for x in xs])
    assert lo.shape == hi.shape == ()
    assert lo.dtype == hi.dtype == torch.float32
    assert float(lo) == float(everything.min()) and float(hi) == float(everything.max())


@SETTINGS
@given(
    xs=st.lists(
        hnp.arrays(
            np.float32, st.tuples(st.integers(1, 4), st.just(3), st.integers(1, 4)), elements=finite
        ),
        min_size=1,
        max_size=4,
    ),
    axis=st.sampled_from([1, -2]),
)
def test_minmax_per_channel(xs: list[np.ndarray], axis: int) -> None:
    obs = O.MinMaxObserver(channel_axis=axis)
    for x in xs:
        obs.update(torch.from_numpy(x))
    lo, hi = obs.range()
    rows = np.concatenate([np.moveaxis(x, 1, 0).reshape(3, -1) for x in xs], axis=1)
    assert lo.shape == hi.shape == (3,)
    assert lo.tolist() == rows.min(axis=1).tolist() and hi.tolist() == rows.max(axis=1).tolist()
    scale, zero = obs.qparams(8, False)
    assert scale.shape == zero.shape == (3,)


@SETTINGS
@given(xs=batches, momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]))
def test_moving_average_formula(xs: list[np.ndarray], momentum: float) -> None:
    obs = O.MovingAverageObserver(momentum=momentum)
    lo = hi = None
    for x in xs:
        obs.update(torch.from_numpy(x))
        b_lo, b_hi = float(x.min()), float(x.max())
        if lo is None or hi is None:
            lo, hi = b_lo, b_hi
        else:
            lo = momentum * lo + (1 - momentum) * b_lo
            hi = momentum * hi + (1 - momentum) * b_hi
    got_lo, got_hi = obs.range()
    assert float(got_lo) == pytest.approx(lo, rel=1e-5, abs=1e-3)
    assert float(got_hi) == pytest.approx(hi, rel=1e-5, abs=1e-3)


def test_moving_average_per_channel() -> None:
    obs = O.MovingAverageObserver(momentum=0.5, channel_axis=0)
    obs.update(torch.tensor([[0.0, 2.0], [-1.0, 1.0]]))
    obs.update(torch.tensor([[-4.0, 4.0], [-3.0, 3.0]]))
    lo, hi = obs.range()
    assert lo.tolist() == [-2.0, -2.0] and hi.tolist() == [3.0, 2.0]


def test_channel_count_must_not_change() -> None:
    obs = O.MinMaxObserver(channel_axis=1)
    obs.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="channel count"):
        obs.update(torch.zeros(2, 4))


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_moving_average_refuses_bad_momentum(momentum: float) -> None:
    with pytest.raises(ValueError, match="momentum"):
        O.MovingAverageObserver(momentum=momentum)


# --- percentile ----------------------------------------------------------------------------


@SETTINGS
@given(
    x=data_1d,
    pct=st.sampled_from([50.0, 90.0, 99.0, 99.9, 99.99, 100.0]),
    symmetric=st.booleans(),
)
def test_percentile_range_and_clipped_share(x: np.ndarray, pct: float, symmetric: bool) -> None:
    obs = O.PercentileObserver(percentile=pct, symmetric=symmetric)
    obs.update(torch.from_numpy(x))
    lo, hi = obs.range()
    assert float(x.min()) <= float(lo) <= float(hi) <= float(x.max())
    if symmetric:
        # [-t, t] intersected with [min, max]: an end is the data's, or the two are opposite
        lo_f, hi_f = float(lo), float(hi)
        assert lo_f == float(x.min()) or hi_f == float(x.max()) or lo_f == -hi_f
    clipped = int(((x < float(lo)) | (x > float(hi))).sum())
    assert clipped <= (100.0 - pct) / 100.0 * x.size + 1e-9


def test_percentile_clips_outliers() -> None:
    x = laplace_with_outliers()
    obs = O.PercentileObserver(percentile=99.9)
    obs.update(x)
    lo, hi = obs.range()
    assert float(hi) < 20.0 and float(lo) > -20.0
    assert float(((x < lo) | (x > hi)).float().mean()) <= 0.001


def test_percentile_refuses_per_channel_and_bad_percentile() -> None:
    with pytest.raises(ValueError, match="per-tensor"):
        O.PercentileObserver(channel_axis=0)
    with pytest.raises(ValueError, match="percentile"):
        O.PercentileObserver(percentile=0.0)


# --- MSE -----------------------------------------------------------------------------------


@SETTINGS
@given(x=data_1d, bits=st.integers(2, 8), symmetric=st.booleans())
def test_mse_range_is_no_worse_than_minmax(x: np.ndarray, bits: int, symmetric: bool) -> None:
    t = torch.from_numpy(x)
    obs = O.MSEObserver(bits=bits, symmetric=symmetric)
    obs.update(t)
    lo, hi = obs.range()
    assert float(t.min()) <= float(lo) <= float(hi) <= float(t.max())
    chosen = quant_mse(t, *obs.qparams(bits, symmetric), bits, symmetric)
    mm = P.params_from_range(t.min(), t.max(), bits, symmetric)
    baseline = quant_mse(t, *mm, bits, symmetric)
    assert chosen <= baseline * (1 + 1e-6) + 1e-30  # up to float32 rounding of clipped errors


def test_mse_clips_outliers_at_low_bits() -> None:
    x = laplace_with_outliers()
    obs = O.MSEObserver(bits=4, symmetric=True)
    obs.update(x)
    lo, hi = obs.range()
    assert float(hi) < float(x.max()) and float(lo) > float(x.min())
    chosen = quant_mse(x, *obs.qparams(4, True), 4, True)
    baseline = quant_mse(x, *P.params_from_range(x.min(), x.max(), 4, True), 4, True)
    assert chosen < 0.5 * baseline


# --- KL ------------------------------------------------------------------------------------


def test_kl_clips_a_heavy_tail_below_the_max() -> None:
    x = laplace_with_outliers()
    obs = O.KLObserver()
    obs.update(x)
    lo, hi = obs.range()
    assert 1.0 < float(hi) < float(x.max())
    assert float(x.min()) < float(lo) < -1.0
    assert float(lo) == -float(hi)  # a symmetric threshold inside both ends


def test_kl_keeps_the_range_of_a_uniform_sample() -> None:
    x = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    obs = O.KLObserver()
    obs.update(x)
    _, hi = obs.range()
    assert float(hi) > 0.9 * float(x.max())


def reference_kl(h: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Straightforward per-cut KL divergences, as documented in ``_kl_divergences``."""
    out = []
    for i in range(n_levels, h.numel() + 1):
        p = h[:i].clone()
        p[i - 1] += h[i:].sum()
        q = torch.zeros(i, dtype=torch.float64)
        chunk = torch.arange(i) * n_levels // i
        for c in range(n_levels):
            members = (chunk == c) & (p > 0)
            if members.any():
                q[members] = h[:i][chunk == c].sum() / members.sum()
        p, q = p / p.sum(), q / q.sum().clamp(min=1e-300)
        q = torch.where((p > 0) & (q <= 0), 1e-12, q)
        out.append(sum(float(a * math.log(a / b)) for a, b in zip(p, q, strict=True) if a > 0))
    return torch.tensor(out, dtype=torch.float64)


@SETTINGS
@given(
    h=hnp.arrays(np.int64, st.integers(2, 24), elements=st.integers(0, 5)),
    levels=st.integers(1, 8),
)
def test_kl_divergences_match_a_direct_computation(h: np.ndarray, levels: int) -> None:
    hist = torch.from_numpy(h).double()
    if hist.sum() == 0:
        hist[0] = 1.0
    levels = min(levels, hist.numel())
    got = O._kl_divergences(hist, levels)
    assert torch.allclose(got, reference_kl(hist, levels), atol=1e-9)


def test_kl_refuses_too_few_bins() -> None:
    with pytest.raises(ValueError, match="bins"):
        O.KLObserver(bits=8, bins=64)


# --- shared behaviour ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(O.OBSERVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(name: str, bad: float) -> None:
    obs = O.make_observer(name)
    with pytest.raises(
        ValueError, match=r"non-finite values \(NaN or Inf\) in the observed tensor"
    ):
        obs.update(torch.tensor([1.0, bad, -2.0]))


@pytest.mark.parametrize("name", sorted(O.OBSERVERS))
def test_range_before_update_raises(name: str) -> None:
    obs = O.make_observer(name)
    with pytest.raises(ValueError, match="observer saw no data"):
        obs.range()
    obs.update(torch.zeros(0))  # an empty batch is no data either
    with pytest.raises(ValueError, match="observer saw no data"):
        obs.qparams(8, True)


@pytest.mark.parametrize("name", sorted(O.OBSERVERS))
def test_all_zero_data_gives_scale_one(name: str) -> None:
    obs = O.make_observer(name)
    obs.update(torch.zeros(10))
    for symmetric in (True, False):
        scale, zero = obs.qparams(8, symmetric)
        assert scale.shape == () and float(scale) == 1.0
        codes = P.quantize(torch.zeros(1, 10), scale, zero, 8, symmetric)
        assert torch.equal(P.dequantize(codes, scale, zero), torch.zeros(1, 10))


@pytest.mark.parametrize("name", sorted(O.OBSERVERS))
def test_qparams_match_params_from_range(name: str) -> None:
    obs = O.make_observer(name)
    obs.update(laplace_with_outliers(2_000))
    lo, hi = obs.range()
    for bits, symmetric in [(8, True), (4, False)]:
        got = obs.qparams(bits, symmetric)
        want = P.params_from_range(lo, hi, bits, symmetric)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", sorted(O.OBSERVERS))
def test_same_data_gives_the_same_range(name: str) -> None:
    g = torch.Generator().manual_seed(5)
    n = O.PER_UPDATE_SAMPLE + 1000  # sampled, not kept whole
    xs = [torch.randn(n, generator=g) * (i + 1) for i in range(2)]
    ranges = []
    for _ in range(2):
        obs = O.make_observer(name)
        for x in xs:
            obs.update(x)
        ranges.append(obs.range())
    assert torch.equal(ranges[0][0], ranges[1][0]) and torch.equal(ranges[0][1], ranges[1][1])


def test_sample_is_bounded_and_uniform_over_batches() -> None:
    obs = O.PercentileObserver()
    small, big = torch.full((2**19,), 1.0), torch.full((3 * 2**19,), 2.0)
    obs.update(small)
    obs.update(big)
    obs.update(torch.full((2**18,), 3.0))
    sample = obs._sample
    assert sample.numel() <= O.SAMPLE_CAP
    total = 2**19 + 3 * 2**19 + 2**18
    for value, count in [(1.0, 2**19), (2.0, 3 * 2**19), (3.0, 2**18)]:
        share = float((sample == value).float().mean())
        assert share == pytest.approx(count / total, abs=0.01)


def test_small_batches_are_kept_whole() -> None:
    obs = O.PercentileObserver(percentile=100.0)
    x = torch.arange(1000.0)
    obs.update(x[:600])
    obs.update(x[600:])
    assert torch.equal(obs._sample.sort().values, x)


def test_per_channel_is_refused_by_sampled_observers() -> None:
    for name in ("percentile", "mse", "kl"):
        with pytest.raises(ValueError, match="per-tensor"):
            O.make_observer(name, channel_axis=1)


def test_make_observer() -> None:
    assert set(O.OBSERVERS) == {"minmax", "moving_average", "percentile", "mse", "kl"}
    for name, cls in O.OBSERVERS.items():
        assert cls.name == name and isinstance(O.make_observer(name), cls)
    obs = O.make_observer("mse", bits=4, symmetric=True)
    assert isinstance(obs, O.MSEObserver) and obs.bits == 4 and obs.symmetric
    assert O.make_observer("moving_average", momentum=0.5).momentum == 0.5  # type: ignore[attr-defined]


def test_make_observer_unknown_name() -> None:
    allowed = "minmax, moving_average, percentile, mse, kl"
    with pytest.raises(ValueError, match=f"unknown observer 'histogram'; allowed: {allowed}"):
        O.make_observer("histogram")


def test_kl_keeps_the_range_of_few_distinct_values_at_4_bits() -> None:
    """Regression: pixels in 17 levels (half of them zero) were clipped to the first level."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (20_000,), generator=gen).float() / 16
    x[torch.rand(20_000, generator=gen) < 0.5] = 0.0
    obs = O.KLObserver(bits=4, symmetric=False)
    obs.update(x)
    lo, hi = obs.range()
    assert float(lo) == 0.0 and float(hi) == 1.0


def test_kl_one_sided_clips_only_the_top_of_a_relu_tail() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=gen).exp().clamp(max=60.0)  # a long right tail
    x[:25_000] = 0.0
    obs = O.KLObserver(bits=4, symmetric=False)
    obs.update(x)
    lo, hi = obs.range()
    clipped = float((x > hi).float().sum() / (x > 0).float().sum())
    assert float(lo) == 0.0
    assert float(hi) < float(x.max())
    assert clipped <= 0.01  # max_clip


def test_kl_refuses_a_bad_max_clip() -> None:
    with pytest.raises(ValueError, match="max_clip"):
        O.KLObserver(max_clip=1.0)
