"""Half-precision factors: solves and Procrustes traces run in float32, dtypes are kept."""

from __future__ import annotations

import pytest
import torch

from kron.core import (
    GEOMETRIES,
    FitOptions,
    LayoutOptions,
    fit,
    get_ops,
    init_factors,
    init_lipschitz,
    make_plan,
    procrustes_step2,
    solve_transpose,
)

OPS = get_ops("torch")


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bfloat16_factors_stay_bfloat16_and_finite(geometry):
    plan = make_plan((6, 5), LayoutOptions(max_skew=float("inf")))
    options = FitOptions(geometry=geometry)
    factors = init_factors(
        plan, 1.0, torch.zeros((), dtype=torch.bfloat16), OPS, options.state_is_p
    )
    lipschitz = init_lipschitz(plan, torch.zeros(()), OPS)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(1, 6, 5, generator=gen).to(torch.bfloat16)
        noise = torch.randn(1, 6, 5, generator=gen).to(torch.bfloat16)
        factors, lipschitz = fit(factors, lipschitz, x, noise, lr=0.1, options=options, ops=OPS)
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f).all() for f in factors)
    assert all(lip.dtype == torch.float32 for lip in lipschitz)


def test_solve_with_bfloat16_factor_and_float32_vector():
    q = torch.triu(torch.rand(1, 4, 4)) + 2 * torch.eye(4)
    v = torch.randn(1, 4, 3)
    solved = solve_transpose([q.to(torch.bfloat16), torch.ones(1, 3)], v, OPS)
    assert solved.dtype == torch.float32
    expected = torch.linalg.solve(q.to(torch.bfloat16).float().mT, v)
    torch.testing.assert_close(solved, expected, rtol=1e-5, atol=1e-5)


def test_procrustes_in_bfloat16_reduces_asymmetry():
    gen = torch.Generator().manual_seed(1)
    q = (torch.eye(8) + 0.05 * torch.randn(8, 8, generator=gen))[None].to(torch.bfloat16)
    stepped = q
    for _ in range(5):
        stepped = procrustes_step2(stepped, OPS)
    assert stepped.dtype == torch.bfloat16

    def asymmetry(m):
        m = m.float()
        return (m - m.mT).abs().max().item()

    assert asymmetry(stepped) < 0.25 * asymmetry(q)


def test_jax_half_precision_products_keep_their_dtype_and_round_once():
    """A bfloat16 product on the JAX backend (accumulated in float32 for speed on XLA:CPU) is
    bfloat16 and equals the exact product of its inputs rounded once to bfloat16."""
    import jax.numpy as jnp
    import numpy as np

    jax_ops = get_ops("jax")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((2, 48, 300)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((2, 300, 40)), jnp.bfloat16)
    product = jax_ops.matmul(a, b)
    assert product.dtype == jnp.bfloat16
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    rounded_once = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), np.float64)
    # float32 accumulation leaves at most a float32 rounding before the final one.
    assert np.mean(np.asarray(product, np.float64) == rounded_once) > 0.99
    assert jax_ops.matmul(a.astype(jnp.float32), b.astype(jnp.float32)).dtype == jnp.float32
