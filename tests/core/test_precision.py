"""Half-precision factors: solves and Procrustes traces run in float32, dtypes are kept."""

from __future__ import annotations

import pytest
import torch

from kron.core import (
    GEOMETRIES,
    NORM_BOUNDS,
    FitOptions,
    LayoutOptions,
    clip_l2,
    clip_rms,
    fit,
    get_ops,
    init_factors,
    init_lipschitz,
    make_plan,
    procrustes_step2,
    procrustes_step3,
    solve_transpose,
)

OPS = get_ops("torch")


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bfloat16_factors_stay_bfloat16_and_follow_the_float32_fit(geometry):
    """Twenty bfloat16 fits stay bfloat16, move the factors (by 6–12 % of their largest entry)
    and stay within 4 % of the float32 fits from the same start and inputs (at most 2.7 %
    measured, a few bfloat16 ulps; a fit that did nothing in bfloat16 would be 6 % off)."""
    plan = make_plan((6, 5), LayoutOptions(max_skew=float("inf")))
    options = FitOptions(geometry=geometry)
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        factors = init_factors(plan, 1.0, torch.zeros((), dtype=dtype), OPS, options.state_is_p)
        start = [f.clone() for f in factors]
        lipschitz = init_lipschitz(plan, torch.zeros(()), OPS)
        gen = torch.Generator().manual_seed(0)
        for _ in range(20):
            x = torch.randn(1, 6, 5, generator=gen).to(torch.bfloat16).to(dtype)
            noise = torch.randn(1, 6, 5, generator=gen).to(torch.bfloat16).to(dtype)
            factors, lipschitz = fit(factors, lipschitz, x, noise, lr=0.1, options=options, ops=OPS)
        runs[dtype] = factors, start
    (half, start), (wide, _) = runs[torch.bfloat16], runs[torch.float32]
    for h, w, s in zip(half, wide, start):
        assert h.dtype == torch.bfloat16
        scale = w.abs().max()
        assert (w - s.float()).abs().max() > 0.05 * scale
        assert (h.float() - w).abs().max() < 0.04 * scale


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


@pytest.mark.parametrize("step", [procrustes_step2, procrustes_step3])
def test_procrustes_in_bfloat16_is_the_wide_step_rounded(step):
    """bfloat16 rotations multiply in bfloat16 and size the step from float32 scalars; they land
    within a few bfloat16 ulps (2⁻⁸ of the largest entry) of the float64 step from the same Q."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(1, 64, 64, generator=gen, dtype=torch.float64)
    rotation = torch.linalg.matrix_exp(0.1 * (a - a.mT))
    q = (rotation @ (torch.eye(64) + 0.3 * a @ a.mT / 64)).to(torch.bfloat16)
    low = step(q, OPS)
    high = step(q.double(), OPS)
    assert low.dtype == torch.bfloat16
    # Measured 0.79 of 2⁻⁸·max for both (0.5 with float32 products; 3.0 and 6.9 with c in bfloat16).
    assert (low.double() - high).abs().max() < 2 * 2.0**-8 * high.abs().max()


def test_torch_half_precision_products_of_transposed_operands():
    """A bfloat16 batch of one takes the 2-D product, which reads transposed operands in place;
    the result is the batched product's, rounded once from float32 accumulation."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 40, 30, generator=gen).to(torch.bfloat16)
    b = torch.randn(1, 50, 40, generator=gen).to(torch.bfloat16)
    product = OPS.matmul(OPS.mT(a), OPS.mT(b))
    assert product.shape == (1, 30, 50) and product.dtype == torch.bfloat16
    exact = (a.double().mT @ b.double().mT).float().to(torch.bfloat16)
    assert (product == exact).double().mean() > 0.99
    stacked = OPS.matmul(OPS.mT(a.expand(2, 40, 30)), OPS.mT(b.expand(2, 50, 40)))
    assert torch.equal(stacked[0], product[0])


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


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("clip", ["rms", "l2"])
def test_float16_updates_are_clipped_by_a_norm_taken_in_float32(clip, backend):
    """Entries of 300 square past float16's range (65504): a norm summed from float16 squares
    (NumPy's, JAX's, Keras's) would be inf and the clip factor 0, which stops training with
    float16 factors."""
    import numpy as np

    ops = get_ops(backend)
    y = np.full((2, 8, 8), 300.0, dtype=np.float16)
    y[1] = 0.01
    as_array = torch.as_tensor if backend == "torch" else ops.asarray
    clipped = (clip_rms if clip == "rms" else clip_l2)(as_array(y), 1.1, ops)
    clipped = np.asarray(clipped)
    assert clipped.dtype == np.float16 and np.isfinite(clipped).all()
    top = clipped[0].astype(np.float64)
    size = np.sqrt(np.mean(top**2)) if clip == "rms" else np.linalg.norm(top)
    assert size == pytest.approx(1.1, rel=1e-2)
    np.testing.assert_array_equal(clipped[1], y[1])  # already below the cap


@pytest.mark.parametrize("size", [1e-4, 3e-5])
def test_procrustes_step3_in_float32_near_symmetry_matches_float64(size):
    """Near symmetry the larger root (−t2 − √disc)/(0.75·t3) cancelled to 0 in float32 and the
    step stopped moving Q (relative asymmetry 1e-4 stayed 1e-4); the cancellation-free form
    2·t1/(√disc − t2) takes the float64 step."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    q = (
        a @ a.mT / 8 + torch.eye(8) + size * torch.randn(8, 8, generator=gen, dtype=torch.float64)
    )[None]
    low, high = procrustes_step3(q.float(), OPS), procrustes_step3(q, OPS)

    def asymmetry(m):
        m = m.double()
        return ((m - m.mT).abs().max() / m.abs().max()).item()

    assert asymmetry(high) < 0.5 * asymmetry(q)
    assert asymmetry(low) == pytest.approx(asymmetry(high), rel=0.05)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("bound", NORM_BOUNDS)
def test_float16_fit_normalises_by_a_norm_past_float16s_range(bound, backend):
    """A flat rank-1 gradient on a 320-wide axis: every entry of T1 fits float16, but its norm
    estimates (‖T1 x‖, and ‖T1‖² for the power estimator) do not. They came out 0 or NaN, so the
    step was far too large (Q lost its positive definiteness) or the fit was refused for good.
    Estimated in float32, L and the new Q are the float32 fit's, rounded."""
    import numpy as np

    ops = get_ops(backend)
    convert = np.asarray if backend == "numpy" else torch.from_numpy
    n = 320
    plan = make_plan((n, n))
    rng = np.random.default_rng(0)
    signs = np.sign(rng.standard_normal((2, n)))
    gradient = 1e-2 * np.outer(*signs)[None]
    noise = rng.standard_normal(gradient.shape)
    probes = [rng.standard_normal((1, 8, n)) for _ in range(2)]
    options = FitOptions(norm_bound=bound)
    results = {}
    for dtype in ("float32", "float16"):
        like = convert(np.zeros((), dtype))
        factors = init_factors(plan, 5.0, like, ops)
        lipschitz = init_lipschitz(plan, convert(np.zeros((), "float32")), ops)
        results[dtype] = fit(
            factors,
            lipschitz,
            convert(gradient.astype(dtype)),
            convert(noise.astype(dtype)),
            lr=0.1,
            options=options,
            ops=ops,
            norm_probes=[convert(p.astype(dtype)) for p in probes],
        )
    (wide_factors, wide_lips), (half_factors, half_lips) = results["float32"], results["float16"]
    for wide, half in zip(wide_lips, half_lips):
        np.testing.assert_allclose(np.asarray(half, float), np.asarray(wide, float), rtol=2e-3)
    for wide, half in zip(wide_factors, half_factors):
        half = np.asarray(half, np.float64)[0]
        assert np.linalg.eigvalsh(0.5 * (half + half.T)).min() > 0
        np.testing.assert_allclose(half, np.asarray(wide, np.float64)[0], rtol=0, atol=0.025)
