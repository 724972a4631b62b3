"""The core at the ends of the floating-point range: norm bounds, finiteness checks and the
automatic init scale must not change their answer because an intermediate overflowed or
underflowed where the true value is representable (or close to it)."""

from __future__ import annotations

import numpy as np
import pytest

from kron.core import (
    FitOptions,
    fit,
    fourth_moment,
    init_factors,
    init_lipschitz,
    make_plan,
    precondition,
    scale_from_moments,
)
from kron.core.layout import LayoutOptions
from kron.core.norms import lb_power, lb_rowcol


def _spike(n: int = 65, dominant: int = 5) -> np.ndarray:
    """``I + 50 e_d e_dᵀ``: ‖M‖ = 51, and starting the bound from row 0 would give 1."""
    m = np.eye(n)
    m[dominant, dominant] += 50.0
    return m[None]


@pytest.mark.parametrize("bound", [lb_power, lb_rowcol])
@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e25])
def test_norm_bounds_find_the_dominant_row_at_any_scale(backend, bound, scale):
    """At 1e25 every float32 row norm overflows to inf (at 1e-25 every one is 0), which made
    argmax pick row 0; the largest diagonal entry then picks the row."""
    m = backend.array((_spike() * scale).astype(np.float32))
    estimate = float(backend.numpy(bound(m, backend.ops))[0])
    assert estimate == pytest.approx(51.0 * scale, rel=1e-5)


def test_float16_diagonal_factor_past_65504_entries_is_fitted(backend):
    """A float16 factor of 70 000 entries near 1 sums past float16's largest number; the
    finiteness check of the fit used that sum and kept such a factor at its start forever."""
    ops = backend.ops
    plan = make_plan((70_000,), LayoutOptions())
    like = backend.array(np.zeros((), np.float16))
    factors = init_factors(plan, 1.0, like, ops)
    lipschitz = init_lipschitz(plan, backend.array(np.zeros((), np.float32)), ops)
    rng = np.random.default_rng(0)
    x = backend.array((2.0 * rng.standard_normal((1, 70_000))).astype(np.float16))
    noise = backend.array(rng.standard_normal((1, 70_000)).astype(np.float16))
    new, new_lip = fit(factors, lipschitz, x, noise, lr=0.1, options=FitOptions(), ops=ops)
    start, after = backend.numpy(factors[0]).astype(np.float64), backend.numpy(new[0])
    assert np.isfinite(after).all() and float(backend.numpy(new_lip[0])[0]) > 0
    assert np.abs(after.astype(np.float64) - start).max() > 1e-3


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1e10, (1.0 / np.finfo(np.float32).tiny) ** -0.125),  # clamped: 1.8e-5, not 1.0
        (1e-12, (np.finfo(np.float32).tiny + 1e-36) ** -0.125),  # δ⁴ dominates: 3.16e4
        (3e-3, None),  # in range: exactly (mean g⁴ + δ⁴)^(-1/8)
        (0.0, 1.0),  # a zero gradient falls back to 1.0
        (np.inf, 1.0),  # so does a non-finite one
        (np.nan, 1.0),
    ],
)
def test_init_scale_of_float32_gradients_far_from_one(backend, size, expected):
    """``mean(g⁴)`` of a float32 gradient overflowed past |g| ≈ 1e9 and underflowed below
    |g| ≈ 1e-10, and either sent the init scale to its fallback 1.0."""
    g = np.full((4, 5), size, np.float32)
    g[0, 0] = 2 * size if np.isfinite(size) else size
    if expected is None:
        expected = (np.mean(g.astype(np.float64) ** 4) + 1e-36) ** -0.125
    ops = backend.ops
    scale = scale_from_moments(fourth_moment(backend.array(g), ops), ops)
    assert float(backend.numpy(scale)) == pytest.approx(expected, rel=1e-5)


def test_p_factors_that_are_not_exactly_symmetric_are_applied_as_themselves(backend):
    """PRO4P keeps P_i symmetric only to 1e-3·max|P_i|: with ``symmetric=False`` each axis gets
    P_i (not P_iᵀ on the axes where the transpose is cheaper), so P x = (⊗P_i) x."""
    rng = np.random.default_rng(3)
    factors = [rng.standard_normal((1, n, n)) for n in (3, 4, 5)]
    x = rng.standard_normal((1, 3, 4, 5))
    got = precondition(
        [backend.array(f) for f in factors], backend.array(x), backend.ops, True, False
    )
    expected = np.kron(np.kron(factors[0][0], factors[1][0]), factors[2][0]) @ x.reshape(-1)
    np.testing.assert_allclose(backend.numpy(got).reshape(-1), expected, rtol=1e-10)
    assert not FitOptions(geometry="PRO4P").symmetric_p
    assert FitOptions(geometry="QUAD4P").symmetric_p


def test_qep_fit_of_a_padded_block_matches_the_unpadded_fit(numpy_backend):
    """QEP balances before every fit and is not invariant to the split; the padded diagonal stays
    at its initial value, so its max|Q_i| once set the split and the real part of a padded block
    drifted from the same fit without padding (4e-3 after 50 fits). Balance reads real entries."""
    ops = numpy_backend.ops
    padded = make_plan((6, 3), LayoutOptions(block_size=4, max_skew=np.inf))
    alone = make_plan((2, 3), LayoutOptions(max_skew=np.inf))
    mask, like, options = padded.mask(), np.zeros((), np.float64), FitOptions(geometry="QEP")
    fp, lp = init_factors(padded, 1.0, like, ops), init_lipschitz(padded, like, ops)
    fa, la = init_factors(alone, 1.0, like, ops), init_lipschitz(alone, like, ops)
    last = (slice(-1, None), slice(0, 2), slice(0, 3))  # the real part of the last block
    rng = np.random.default_rng(1)
    for _ in range(50):
        x = padded.to_blocks(rng.standard_normal((6, 3)) * np.linspace(0.5, 2, 3), ops)
        noise = rng.standard_normal(x.shape)
        fp, lp = fit(fp, lp, x, noise, lr=0.2, options=options, ops=ops, mask=mask)
        fa, la = fit(fa, la, x[last], noise[last], lr=0.2, options=options, ops=ops)
    for q_padded, q_alone in zip(fp, fa):
        n = q_alone.shape[-1]
        real = q_padded[-1:, :n, :n] if q_padded.ndim == 3 else q_padded[-1:, :n]
        np.testing.assert_allclose(real, q_alone, rtol=1e-10, atol=1e-12)
