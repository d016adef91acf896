"""Low-rank math (factorize/lowrank.py): SVD truncation, rank rules, Tucker-2, spatial SVD."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.factorize import lowrank

SETTINGS = settings(max_examples=15, deadline=None)


def weight(out: int, inp: int, seed: int) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(out=st.integers(1, 12), inp=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_full_rank_svd_reproduces_the_weight(out: int, inp: int, seed: int) -> None:
    w = weight(out, inp, seed)
    b, a = lowrank.truncate(w, min(out, inp))
    torch.testing.assert_close((b @ a).float(), w, atol=1e-5, rtol=0)


@SETTINGS
@given(out=st.integers(2, 12), inp=st.integers(2, 12), seed=st.integers(0, 10_000), data=st.data())
def test_truncation_error_is_the_discarded_singular_values(
    out: int, inp: int, seed: int, data: st.DataObject
) -> None:
    w = weight(out, inp, seed).double()
    r = data.draw(st.integers(1, min(out, inp)))
    b, a = lowrank.truncate(w, r)
    s = torch.linalg.svdvals(w)
    err = float(((w - b @ a) ** 2).sum())
    discarded = float((s[r:] ** 2).sum())
    assert math.isclose(err, discarded, rel_tol=1e-4, abs_tol=1e-9)


@SETTINGS
@given(
    s=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=20),
    energy=st.floats(0.01, 1.0),
)
def test_energy_rule_picks_the_minimal_rank(s: list[float], energy: float) -> None:
    sv = torch.tensor(sorted(s, reverse=True), dtype=torch.float64)
    r = lowrank.energy_rank(sv, energy)
    cum = torch.cumsum(sv**2, 0)
    assert float(cum[r - 1]) >= energy * float(cum[-1]) * (1 - 1e-12)
    if r > 1:
        assert float(cum[r - 2]) < energy * float(cum[-1])


def test_energy_rule_full_and_tiny() -> None:
    sv = torch.tensor([4.0, 2.0, 1.0])
    assert lowrank.energy_rank(sv, 1.0) == 3
    assert lowrank.energy_rank(sv, 16 / 21) == 1
    assert lowrank.energy_rank(sv, 0.77) == 2


@given(out=st.integers(1, 64), inp=st.integers(1, 64), ratio=st.floats(0.01, 0.99))
def test_ratio_rule_stays_within_the_budget(out: int, inp: int, ratio: float) -> None:
    r = lowrank.ratio_rank(out, inp, ratio)
    assert r * (out + inp) <= ratio * out * inp
    assert (r + 1) * (out + inp) > ratio * out * inp  # the largest such rank


def test_max_shrinking_rank() -> None:
    for inp, out in [(8, 8), (3, 5), (1, 7), (16, 4)]:
        r = lowrank.max_shrinking_rank(inp, out)
        assert r == 0 or lowrank.shrinks(r, inp, out)
        assert not lowrank.shrinks(r + 1, inp, out)


def test_tucker_full_rank_is_exact_and_hooi_does_not_hurt() -> None:
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0)).double()
    u_out, core, u_in = lowrank.tucker2(w, 6, 5, iters=2)
    torch.testing.assert_close(lowrank.tucker2_weight(u_out, core, u_in), w, atol=1e-10, rtol=0)
    errs = []
    for iters in (0, 5):
        approx = lowrank.tucker2_weight(*lowrank.tucker2(w, 3, 2, iters=iters))
        errs.append(float(((w - approx) ** 2).sum()))
    assert errs[1] <= errs[0] + 1e-9


def test_tucker_ratio_ranks_fit_the_budget_and_keep_proportions() -> None:
    r_in, r_out = lowrank.tucker_ratio_ranks(16, 32, 9, 0.5)  # type: ignore[misc]
    assert lowrank.tucker_params(16, 32, 9, r_in, r_out) <= 0.5 * 16 * 32 * 9
    assert abs(r_out - 2 * r_in) <= 1
    assert lowrank.tucker_ratio_ranks(1, 1, 1, 0.5) is None


def test_spatial_svd_full_rank_is_exact() -> None:
    w = torch.randn(4, 3, 3, 2, generator=torch.Generator().manual_seed(1)).double()
    v, h = lowrank.spatial_svd(w, min(3 * 3, 4 * 2))
    torch.testing.assert_close(lowrank.spatial_weight(v, h), w, atol=1e-10, rtol=0)


def test_allocation_favours_the_sensitive_layer_within_the_budget() -> None:
    gains = [torch.tensor([9.0, 8.0, 7.0, 6.0]), torch.tensor([1.0, 0.1, 0.01, 0.001])]
    ranks = lowrank.allocate_ranks(gains, costs=[10, 10], caps=[4, 4], budget=50)
    assert ranks == [4, 1]
    assert lowrank.allocate_ranks(gains, costs=[10, 10], caps=[4, 4], budget=5) == [0, 0]


@settings(max_examples=40, deadline=None)
@given(
    c_in=st.integers(1, 12),
    c_out=st.integers(1, 12),
    kh=st.integers(1, 3),
    ratio=st.floats(0.05, 0.99),
)
def test_ratio_ranks_always_build_a_core_of_their_shape(c_in, c_out, kh, ratio):
    ranks = lowrank.tucker_ratio_ranks(c_in, c_out, kh * kh, ratio)
    if ranks is None:
        assert lowrank.tucker_params(c_in, c_out, kh * kh, 1, 1) > ratio * c_in * c_out * kh * kh
        return
    r_in, r_out = ranks
    assert lowrank.tucker_params(c_in, c_out, kh * kh, r_in, r_out) <= ratio * c_in * c_out * kh**2
    w = torch.randn(c_out, c_in, kh, kh, generator=torch.Generator().manual_seed(c_in * c_out))
    u_out, core, u_in = lowrank.tucker2(w, r_out, r_in, iters=1)
    assert core.shape == (r_out, r_in, kh, kh)
    assert u_out.shape == (c_out, r_out) and u_in.shape == (c_in, r_in)
