"""The least-squares separable fit (separable/fit.py): exact where it can be, optimal else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.separable.fit import compose, relative_error, separable_fit, separable_params

shapes = st.tuples(
    st.integers(1, 6),  # Cout
    st.integers(1, 5),  # Cin
    st.integers(1, 3),  # kh
    st.integers(1, 3),  # kw
    st.integers(1, 3),  # m
    st.integers(0, 2**31 - 1),  # seed
)


def random_kernel(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_an_exactly_separable_kernel_is_reproduced(case):
    cout, cin, kh, kw, m, seed = case
    d = random_kernel(cin * m, 1, kh, kw, seed=seed)
    p = random_kernel(cout, cin * m, 1, 1, seed=seed + 1)
    w = compose(d, p, cin)  # (Cout, Cin, kh, kw), rank <= m per input channel
    fit = separable_fit(w, m)
    assert fit.depthwise.shape == (cin * m, 1, kh, kw)
    assert fit.pointwise.shape == (cout, cin * m, 1, 1)
    torch.testing.assert_close(compose(fit.depthwise, fit.pointwise, cin), w, atol=1e-4, rtol=0)
    assert fit.error < 1e-5


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_the_error_is_the_discarded_singular_values_energy(case):
    cout, cin, kh, kw, m, seed = case
    w = random_kernel(cout, cin, kh, kw, seed=seed)
    a = w.double().permute(1, 0, 2, 3).reshape(cin, cout, kh * kw).numpy()
    s = np.linalg.svd(a, compute_uv=False)  # (Cin, min(Cout, K)), descending
    expected = np.sqrt((s[:, m:] ** 2).sum() / (s**2).sum())
    fit = separable_fit(w, m)
    assert fit.error == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # the reported error is that of the factors returned
    approx = compose(fit.depthwise.double(), fit.pointwise.double(), cin)
    assert relative_error(w, approx) == pytest.approx(fit.error, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(("cout", "kernel", "m"), [(4, (3, 3), 4), (16, (3, 3), 9), (5, (2, 3), 7)])
def test_a_multiplier_of_the_full_rank_reproduces_any_kernel(cout, kernel, m):
    w = random_kernel(cout, 3, *kernel, seed=m)
    assert m >= min(cout, kernel[0] * kernel[1])
    fit = separable_fit(w, m)
    torch.testing.assert_close(compose(fit.depthwise, fit.pointwise, 3), w, atol=1e-5, rtol=0)
    assert fit.error < 1e-6


def test_a_rank_one_fit_splits_the_scale_evenly_and_spares_get_no_pointwise_weight():
    w = random_kernel(8, 2, 3, 3, seed=3)
    fit = separable_fit(w, 1)
    d = fit.depthwise.reshape(2, 9).norm(dim=1)
    p = fit.pointwise.reshape(8, 2).norm(dim=0)
    torch.testing.assert_close(d, p)  # sqrt(s_1) in each factor
    big = separable_fit(random_kernel(2, 2, 3, 3, seed=4), 4)  # rank 2 < 4 filters
    pointwise = big.pointwise.reshape(2, 2, 4)  # (Cout, Cin, m)
    assert torch.all(pointwise[:, :, 2:] == 0)
    assert torch.all(big.depthwise.reshape(2, 4, 9)[:, 2:].norm(dim=2) > 0)


def test_zero_kernel_bad_shapes_and_param_count():
    assert separable_fit(torch.zeros(3, 2, 3, 3)).error == 0.0
    with pytest.raises(ValueError, match="kernel"):
        separable_fit(torch.zeros(3, 3, 3))
    with pytest.raises(ValueError, match="multiplier"):
        separable_fit(torch.zeros(3, 2, 3, 3), 0)
    assert separable_params(64, 64, 3, 3, 1) == 64 * 9 + 64 * 64
